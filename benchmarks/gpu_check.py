"""The first thing to run on a machine with an NVIDIA GPU and TensorRT: does the TensorRT path work?

    python -m posterrt.benchmarks.gpu_check --out gpu_check.json

One command, one JSON. For each (preset, UNet) of ``--runs`` (default: the tiny and the paper-size
``bg_unet``), on the GPU:

1. export the model (random weights) to ONNX, as ``posterrt export`` does, and run it in ONNX
   Runtime (fp32): the reference;
2. prepare it with the engines' clean-up and fp16 policy and build an fp16 plan with the engines'
   own ``build_plan`` (REFIT for ``bg_unet``; a one-shape profile at the contract's opt sizes, the
   shortest build), then deserialize it and check its outputs against ONNX Runtime's;
3. for ``bg_unet`` at the presets of ``--refit-presets`` (default tiny): export the same graph with
   other weights, refit the engine through the engines' ``refit_weights`` and check it against
   ONNX Runtime on the new ONNX (and that its outputs moved: the new weights are in);
4. time one step, the plan against PyTorch fp16 (``module.half()``), with CUDA events.

Tolerance: ``FP16_RTOL`` = 1e-2 of each output's largest magnitude, the engines' fp16 bar (an fp16
UNet step rounds at 5e-4 per op, tens of layers add up to a few 1e-3; an overflow or a broken fp32
island shows as 1e-1 or NaN). Exit status 1 when any check fails, 2 when there is no GPU.

Sized for under 10 minutes on one H100, most of it the paper UNet's export, ONNX preparation and
TensorRT build (not measured yet: no GPU has been lent to this project; the JSON records each
stage's seconds). ``--device cpu`` runs the same code on the CPU with whatever ``tensorrt`` module
is importable (the tests use their stand-in), only to exercise the script: its figures say nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from posterrt.engines.build import build_plan, file_logger, import_tensorrt, load_plugins
from posterrt.engines.cleanup import FP16_RTOL, prepare_onnx, relative_error
from posterrt.engines.onnx_operators import check_file
from posterrt.engines.refit import refit_weights
from posterrt.runtime.contracts import DYNAMIC_DIMS, DimRange
from posterrt.runtime.errors import PosterRTError
from posterrt.runtime.profiles import model_profile
from posterrt.runtime.samples import default_sizes

from .timing import summarize

DEFAULT_RUNS = "tiny:bg_unet,paper:bg_unet"
REFITTABLE = "bg_unet"


def build_reference(model: str, preset: str):
    """The family's PyTorch module for ``model`` at ``preset``, random weights."""
    from posterrt.export.bundle_writer import Sources
    from posterrt.export.registry import MODEL_FAMILY, family_module

    return family_module(MODEL_FAMILY[model]).build(model, preset, Sources())


def step_sizes(exportable) -> dict:
    """The sizes of one step: the contract's opt sizes, with the model's own fixed sizes."""
    return {**default_sizes("opt"), **exportable.size_overrides}


def one_shape_profile(exportable) -> dict:
    """A profile of exactly the step's shapes: the check times one shape, and builds fastest so."""
    sizes = step_sizes(exportable)
    fixed = {name: DimRange(sizes[name], sizes[name], sizes[name], rng.multiple_of) for name, rng in DYNAMIC_DIMS.items()}
    return model_profile(exportable.contract, fixed)


def time_call(run, device: str, repeats: int, warmup: int = 3) -> dict:
    """Latency of ``run()``: CUDA events on the GPU (what the GPU spent, not Python's view of it)."""
    import torch

    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            run()
            samples.append(time.perf_counter() - began)
    return summarize(samples)


def ort_outputs(onnx_path: Path, inputs: dict, output_names) -> list[np.ndarray]:
    """ONNX Runtime's outputs (its CUDA provider where installed, else the CPU)."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(onnx_path), providers=providers).run(list(output_names), inputs)


def parity(actual: dict, expected: list[np.ndarray], output_names) -> dict:
    errors = {name: relative_error(actual[name], want) for name, want in zip(output_names, expected)}
    worst = max(errors.values())
    return {"max_rel": errors, "tolerance_rel": FP16_RTOL, "passed": bool(worst <= FP16_RTOL)}


# ---------------------------------------------------------------------------------------------
# A deserialized plan bound to torch tensors (the engine's life: load, bind, run)
# ---------------------------------------------------------------------------------------------
class PlanRunner:
    """Deserializes ``plan``, binds ``inputs`` (torch tensors on ``device``) and outputs it allocates."""

    def __init__(self, trt, plan: bytes, inputs: dict, output_names, device: str, logger, plugins=()):
        import torch

        load_plugins(trt, logger, plugins)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the plan it just built")
        self.context = self.engine.create_execution_context()
        self.inputs = inputs  # kept alive: the engine reads their memory
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"input {name!r}: shape {tuple(tensor.shape)} is outside the plan's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                  trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.outputs = {}
        for name in output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            self.outputs[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device=device)
            self.context.set_tensor_address(name, self.outputs[name].data_ptr())
        self.stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
        self.device = device

    def run(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")

    def results(self) -> dict:
        import torch

        self.run()
        if self.device == "cuda":
            torch.cuda.synchronize()
        # a copy: on the CPU, .float().cpu().numpy() would alias the buffer the next run overwrites
        return {name: tensor.float().cpu().numpy().copy() for name, tensor in self.outputs.items()}


# ---------------------------------------------------------------------------------------------
# One (preset, model)
# ---------------------------------------------------------------------------------------------
class Stages:
    """Seconds per stage, recorded in the JSON (where the 10 minutes go)."""

    def __init__(self):
        self.seconds, self.began = {}, time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.began, 2)
        self.began = now


def _torch_inputs(arrays: dict, names, device: str, half: bool = False) -> dict:
    import torch

    tensors = {}
    for name in names:
        tensor = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(device)
        tensors[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    return tensors


def _export_prepared(exportable, work: Path, tag: str, refittable: bool) -> tuple[Path, Path, dict]:
    from posterrt.export.onnx_export import export_onnx

    source, prepared = work / tag / f"{exportable.name}.onnx", work / tag / "fp16" / f"{exportable.name}.onnx"
    source.parent.mkdir(parents=True, exist_ok=True)
    exportable.module.cpu()  # the tracer runs on the CPU
    export_onnx(exportable, source)
    report = prepare_onnx(source, prepared, model_name=exportable.name, precision="fp16", refittable=refittable)
    return source, prepared, report


def other_weights(module, seed: int) -> None:
    """New weights for the refit: every parameter moved by 5% of its own spread, in place."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            spread = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.add_(0.05 * spread * torch.randn(parameter.shape, generator=generator))


def check_model(trt, preset: str, model: str, device: str, repeats: int, work: Path, opt_level: int, seed: int,
                refit: bool) -> dict:
    import torch

    stages = Stages()
    exportable = build_reference(model, preset)
    contract = exportable.contract
    names, outputs = contract.input_names, contract.output_names
    arrays = exportable.inputs(step_sizes(exportable), seed)
    stages.done("build_module")
    refittable = model == REFITTABLE
    source, prepared, prepare_report = _export_prepared(exportable, work, preset, refittable)
    stages.done("export_and_prepare")
    expected = ort_outputs(source, arrays, outputs)
    stages.done("onnxruntime_reference")
    operators = check_file(prepared, model)
    logger = file_logger(trt, work / f"{preset}-{model}.build.log")
    try:
        plan, _ = build_plan(trt, prepared, one_shape_profile(exportable), precision="fp16", opt_level=opt_level,
                             workspace_gb=8, refittable=refittable, timing_cache=b"", logger=logger,
                             plugins=operators["plugins"])
        stages.done("tensorrt_build")
        runner = PlanRunner(trt, plan, _torch_inputs(arrays, names, device), outputs, device, logger, operators["plugins"])
        row = {"preset": preset, "model": model, "sizes": {k: v for k, v in step_sizes(exportable).items()
                                                           if k in contract.input_dims()},
               "parameters": sum(p.numel() for p in exportable.module.parameters()), "plan_bytes": len(plan),
               "prepare": {k: prepare_report[k] for k in ("tool", "nodes_before", "nodes_after", "fp32_nodes")},
               "operators": operators["verdict"], "plugins": operators["plugins"]}
        before = runner.results()
        row["tensorrt_fp16_vs_onnxruntime_fp32"] = parity(before, expected, outputs)
        stages.done("tensorrt_parity")
        if refit:
            row["refit"] = _refit(trt, runner, exportable, work, seed, before, outputs, arrays, logger)
            stages.done("refit")
        row["latency"] = _latencies(runner, exportable.module, arrays, names, device, repeats)
        stages.done("latency")
    finally:
        logger.close()
    row["stage_seconds"] = stages.seconds
    del exportable
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _refit(trt, runner: PlanRunner, exportable, work: Path, seed: int, before: dict, outputs, arrays, logger) -> dict:
    """Other weights into the built plan, then parity against ONNX Runtime on the new ONNX."""
    other_weights(exportable.module, seed + 1)
    source, prepared, _ = _export_prepared(exportable, work, "refit", refittable=True)
    began = time.perf_counter()
    weights = refit_weights(trt, runner.engine, prepared, logger)
    seconds = time.perf_counter() - began
    after = runner.results()
    moved = {name: relative_error(after[name], before[name]) for name in outputs}
    return {"weights": weights, "seconds": round(seconds, 2),
            "outputs_moved_rel": moved, "moved": bool(min(moved.values()) > FP16_RTOL),
            "tensorrt_vs_onnxruntime_new_weights": parity(after, ort_outputs(source, arrays, outputs), outputs)}


def _latencies(runner: PlanRunner, module, arrays, names, device: str, repeats: int) -> dict:
    """One step: the plan, and PyTorch fp16 on the same inputs (module.half(), or autocast where
    the module builds fp32 tensors itself), each timed the same way. On the CPU (exercising the
    script only) PyTorch runs fp32: its fp16 convolutions there take seconds per call."""
    import torch

    if device == "cpu":
        fp32 = module.float().eval()
        args = list(_torch_inputs(arrays, names, device).values())
        with torch.inference_mode():
            timings = {"tensorrt_fp16": time_call(runner.run, device, repeats, warmup=1),
                       "torch": time_call(lambda: fp32(*args), device, repeats, warmup=1)}
        timings.update(torch_mode="fp32 (cpu)", speedup_p50=timings["torch"]["p50_ms"] / timings["tensorrt_fp16"]["p50_ms"])
        return timings
    half = module.to(device).half().eval()
    args16 = list(_torch_inputs(arrays, names, device, half=True).values())
    with torch.inference_mode():
        try:
            half(*args16)
            mode, run16 = "half", (lambda: half(*args16))
        except RuntimeError:  # a dtype mismatch inside the module
            fp32 = module.float()
            args32 = list(_torch_inputs(arrays, names, device).values())
            mode = "autocast"

            def run16():
                with torch.autocast(device_type=device, dtype=torch.float16):
                    return fp32(*args32)

        timings = {"tensorrt_fp16": time_call(runner.run, device, repeats), "torch": time_call(run16, device, repeats)}
    timings["torch_mode"] = f"fp16 ({mode})"
    timings["speedup_p50"] = timings["torch"]["p50_ms"] / timings["tensorrt_fp16"]["p50_ms"]
    return timings


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def machine(device: str, trt) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "tensorrt": trt.__version__}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def parse_runs(text: str) -> list[tuple[str, str]]:
    from posterrt.export.registry import check_preset, parse_models

    runs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        preset, sep, model = item.partition(":")
        if not sep:
            raise ValueError(f"--runs: {item!r} is not PRESET:MODEL")
        runs.append((check_preset(preset), parse_models(model)[0]))
    return runs


def run_checks(runs, device: str, repeats: int = 20, opt_level: int = 3, refit_presets=("tiny",), seed: int = 0,
               log=print) -> dict:
    trt = import_tensorrt()
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="posterrt-gpu-check-") as folder:
        for preset, model in runs:
            started = time.perf_counter()
            try:
                row = check_model(trt, preset, model, device, repeats, Path(folder), opt_level, seed,
                                  refit=model == REFITTABLE and preset in refit_presets)
            except Exception as error:  # one model's failure is a finding, not the end of the run
                row = {"preset": preset, "model": model, "error": f"{type(error).__name__}: {error}"}
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            log(_line(row))
    return {"machine": machine(device, trt), "fp16_tolerance_rel": FP16_RTOL, "opt_level": opt_level,
            "total_seconds": round(time.perf_counter() - began, 1), "results": rows, "failed": failures(rows)}


def failures(rows) -> list[str]:
    failed = []
    for row in rows:
        where = f"{row['preset']}:{row['model']}"
        if "error" in row:
            failed.append(f"{where}: {row['error']}")
            continue
        if not row["tensorrt_fp16_vs_onnxruntime_fp32"]["passed"]:
            failed.append(f"{where}: TensorRT fp16 parity")
        refit = row.get("refit")
        if refit and not (refit["moved"] and refit["tensorrt_vs_onnxruntime_new_weights"]["passed"]):
            failed.append(f"{where}: refit")
    return failed


def _line(row: dict) -> str:
    where = f"{row['preset']:5s} {row['model']:12s}"
    if "error" in row:
        return f"{where} ERROR {row['error']}"
    text = (f"{where} parity {max(row['tensorrt_fp16_vs_onnxruntime_fp32']['max_rel'].values()):.1e} "
            f"TensorRT fp16 {row['latency']['tensorrt_fp16']['p50_ms']:.2f} ms  torch {row['latency']['torch_mode']} "
            f"{row['latency']['torch']['p50_ms']:.2f} ms")
    if "refit" in row:
        refit = row["refit"]
        text += (f"  refit {refit['weights']} weights, parity "
                 f"{max(refit['tensorrt_vs_onnxruntime_new_weights']['max_rel'].values()):.1e}")
    return text + f"  ({row['seconds']}s)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"PRESET:MODEL,... (default {DEFAULT_RUNS})")
    parser.add_argument("--refit-presets", default="tiny", help="presets whose bg_unet is refitted (default tiny)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--opt-level", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; run on a GPU machine (or --device cpu to exercise the script)",
              file=sys.stderr)
        return 2
    try:
        runs = parse_runs(args.runs)
        results = run_checks(runs, args.device, args.repeats, args.opt_level,
                             tuple(p.strip() for p in args.refit_presets.split(",")))
    except (ValueError, PosterRTError) as error:  # a malformed --runs, an unknown model, no TensorRT
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    for failure in results["failed"]:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
