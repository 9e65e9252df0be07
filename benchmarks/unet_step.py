"""One UNet-class denoising step (``bg_unet`` / ``render_unet``), every way this CPU can run it,
side by side in one process: the same guided request (batch 2 = uncond + cond), warm-up, then the
candidates interleaved round by round (:func:`timing.interleaved`), so a busy moment of the shared
machine slows all of them alike and the ratios stay fair.

Candidates (those whose prerequisites exist):
  torch-fp32            the PyTorch reference module, eager, fp32 (the baseline of every ratio)
  torch-bf16-autocast   the same module under ``torch.autocast("cpu", bfloat16)``
  torch-bf16-weights    a bf16 copy of the module, bf16 inputs (torch's fastest bf16 form here)
  ort-fp32              the exported ONNX, ONNX Runtime CPU, default optimizations
  ort-<variant>         each ONNX Runtime variant ``posterrt engines optimize`` registered
  openvino-<variant>    each OpenVINO IR variant registered (openvino-fp32, openvino-bf16, openvino-int8)
  ort-int8-iobinding    int8 with IO binding: inputs bound once, the output into a preallocated buffer
  ort-int8-nospin       int8 with the thread pool's spin-waiting off (matters when cores are shared)

Every candidate's output is compared with torch-fp32's (max and RMS relative error), so a fast
candidate that computes something else shows.

    python -m posterrt.benchmarks.unet_step --bundle /work/bundles/paper --model bg_unet --out results/
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.schedulers import batch_for_guidance

from .machine import describe
from .timing import interleaved

BASELINE = "torch-fp32"


def step_inputs(bundle: Bundle, model: str, image_size: int, timestep: float, seed: int) -> dict[str, np.ndarray]:
    """One guided step of a representative request (the quality gate's request generator)."""
    from posterrt.engines.quality_gate import gate_sizes, make_request, unet_settings

    contract = bundle.contract(model)
    _, guidance = unet_settings(bundle, model)
    request = make_request(contract, seed, gate_sizes(image_size), guidance)
    return batch_for_guidance(guidance, shared={"sample": request.noise, "timestep": np.full((1,), timestep, np.float32)},
                              paired={k: (request.unconditional[k], request.conditional[k]) for k in request.conditional})


# ---------------------------------------------------------------------------------------------
# Candidates: each returns a zero-argument callable that runs one step and returns noise_pred
# ---------------------------------------------------------------------------------------------
def torch_candidates(bundle: Bundle, model: str, inputs: dict, threads: int) -> dict:
    import torch

    from posterrt.export.bundle_writer import Sources
    from posterrt.export.registry import MODEL_FAMILY, family_module

    torch.set_num_threads(threads)
    # Family builds are seeded per preset: the same weights the bundle was exported with (the
    # parity column below shows it).
    exportable = family_module(MODEL_FAMILY[model]).build(model, bundle.preset, Sources())
    names = exportable.contract.input_names
    module = exportable.module.eval()
    args = [torch.from_numpy(inputs[n]) for n in names]
    bf16_module = copy.deepcopy(module).to(torch.bfloat16)
    bf16_args = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]

    def fp32():
        with torch.inference_mode():
            return module(*args)[0].numpy()

    def autocast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*args)[0].float().numpy()

    def bf16_weights():
        with torch.inference_mode():
            return bf16_module(*bf16_args)[0].float().numpy()

    return {"torch-fp32": fp32, "torch-bf16-autocast": autocast, "torch-bf16-weights": bf16_weights}


def ort_session(path: Path, threads: int, spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def candidate_name(variant: str) -> str:
    """Candidates are named by the engine that runs them: ``ort-int8``, ``openvino-bf16``."""
    return variant if variant.startswith("openvino-") else f"ort-{variant}"


def ort_candidates(bundle: Bundle, model: str, inputs: dict, threads: int, variants: list[str],
                   skip: tuple = ()) -> dict:
    from posterrt.runtime.backends.openvino import OpenVinoSession, is_openvino_ir

    output = bundle.contract(model).output_names[0]
    candidates = {}
    # Skipped candidates are never loaded: at paper size each session holds GBs of weights.
    sessions = {} if "ort-fp32" in skip else {"ort-fp32": ort_session(bundle.model_path(model), threads)}
    for variant in variants:
        path = bundle.model_path(model, variant=variant)
        sessions[candidate_name(variant)] = OpenVinoSession(path, threads) if is_openvino_ir(path) \
            else ort_session(path, threads)
    for name, session in sessions.items():
        candidates[name] = (lambda s: lambda: s.run([output], inputs)[0])(session)
    if "int8" in variants:
        candidates["ort-int8-iobinding"] = _io_bound(sessions["ort-int8"], inputs, output)
        if "ort-int8-nospin" not in skip:  # a second int8 session: its own weights in memory
            nospin = ort_session(bundle.model_path(model, variant="int8"), threads, spinning=False)
            candidates["ort-int8-nospin"] = lambda: nospin.run([output], inputs)[0]
    return candidates


def _io_bound(session, inputs: dict, output: str):
    """Inputs bound once (a pipeline rebinds only ``sample`` and ``timestep`` per step) and the
    output written into one preallocated buffer reused across steps."""
    binding = session.io_binding()
    for name, array in inputs.items():
        binding.bind_cpu_input(name, array)
    shape = inputs["sample"].shape
    result = np.empty(shape, np.float32)
    binding.bind_output(output, "cpu", 0, np.float32, list(shape), result.ctypes.data)

    def run():
        session.run_with_iobinding(binding)  # no RunOptions: see backends.onnxruntime.iobinding_step
        return result
    return run


# ---------------------------------------------------------------------------------------------
def measure(bundle_dir: Path, model: str, image_size: int = 256, repeats: int = 8, warmup: int = 2,
            threads: int = 2, skip: tuple = (), timestep: float = 500.0) -> dict:
    bundle = Bundle(bundle_dir)
    inputs = step_inputs(bundle, model, image_size, timestep, seed=0)
    variants = [v for v in sorted(bundle.variants(model)) if candidate_name(v) not in skip]
    candidates = {}
    if not {"torch-fp32", "torch-bf16-autocast", "torch-bf16-weights"} <= set(skip):
        try:
            candidates.update(torch_candidates(bundle, model, inputs, threads))
        except ImportError:
            print("torch is not installed: the torch candidates are skipped", file=sys.stderr)
    candidates.update(ort_candidates(bundle, model, inputs, threads, variants, skip))
    candidates = {k: v for k, v in candidates.items() if k not in skip}

    reference = candidates[BASELINE]() if BASELINE in candidates else candidates["ort-fp32"]()
    errors = {}
    for name, run in candidates.items():
        out = run().astype(np.float64)
        diff = out - reference
        errors[name] = {"max_rel": float(np.abs(diff).max() / np.abs(reference).max()),
                        "rel_rms": float(np.sqrt((diff ** 2).mean() / (reference ** 2).mean()))}
    load_before = os.getloadavg()
    timings = interleaved(candidates, repeats=repeats, warmup=warmup)
    load_after = os.getloadavg()
    base = (timings[BASELINE] if BASELINE in timings else timings["ort-fp32"])["p50_ms"]
    bf16_best = min((timings[k]["p50_ms"] for k in ("torch-bf16-autocast", "torch-bf16-weights") if k in timings),
                    default=None)
    rows = []
    for name, stats in timings.items():
        rows.append({"candidate": name, **stats, "speedup_vs_torch_fp32": base / stats["p50_ms"],
                     "speedup_vs_best_torch_bf16": bf16_best / stats["p50_ms"] if bf16_best else None,
                     "vs_torch_fp32": errors[name]})
    return {"model": model, "preset": bundle.preset, "image_size": image_size, "latent": image_size // 8,
            "batch": int(inputs["sample"].shape[0]), "timestep": timestep, "threads": threads, "repeats": repeats,
            "warmup": warmup, "load_average_before": load_before, "load_average_after": load_after, "rows": rows,
            "variants": {v: bundle.variants(model)[v]["gate"]["figures"] for v in variants}}


def table(result: dict) -> str:
    lines = [f"{result['model']} ({result['preset']}), batch {result['batch']}, latent {result['latent']}x{result['latent']}, "
             f"{result['threads']} threads, p50 of {result['repeats']} interleaved rounds; load average "
             f"{result['load_average_before'][0]:.1f} -> {result['load_average_after'][0]:.1f}",
             "| candidate | p50 ms | min ms | x torch fp32 | x best torch bf16 | max rel err | rel RMS err |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        bf16 = row["speedup_vs_best_torch_bf16"]
        lines.append(f"| {row['candidate']} | {row['p50_ms']:.0f} | {row['min_ms']:.0f} | {row['speedup_vs_torch_fp32']:.2f} | "
                     f"{'-' if bf16 is None else f'{bf16:.2f}'} | {row['vs_torch_fp32']['max_rel']:.1e} | "
                     f"{row['vs_torch_fp32']['rel_rms']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.unet_step", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--model", default="bg_unet", choices=("bg_unet", "render_unet"))
    parser.add_argument("--image-size", type=int, default=256, help="pixels (latent = /8); default 256 -> 32x32")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated candidates to leave out (memory)")
    parser.add_argument("--out", type=Path, help="folder for unet_step-MODEL.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.bundle, args.model, args.image_size, args.repeats, args.warmup, args.threads,
                     tuple(s for s in args.skip.split(",") if s))
    print(table(result))
    record(result, "unet_step", args.model, argv, started, args.out)
    return 0


def record(result: dict, bench: str, model: str, argv, started: float, out: Path | None) -> None:
    """Add what reproduces ``result`` (command, date, machine, seconds) and write
    ``OUT/<bench>-<model>.json`` when ``out`` is given."""
    result.update(command=f"python -m posterrt.benchmarks.{bench} " + " ".join(argv if argv is not None else sys.argv[1:]),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=describe(),
                  seconds=round(time.perf_counter() - started, 1))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{bench}-{model}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
