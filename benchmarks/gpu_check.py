"""GPU check of the per-step models: fp16 parity and one denoising step's latency.

    python -m posterrt.benchmarks.gpu_check --presets tiny,paper --out gpu_check.json

For each per-step model (the ones the sampling loop calls: radm_head, plannet_denoiser, bg_unet,
render_unet) and preset, on the GPU:

* PyTorch fp32 vs PyTorch fp16 (``module.half()``): parity of fp16 against fp32 and the latency of
  one call of each, timed with CUDA events. This is what a GPU without TensorRT can run.
* With TensorRT importable as well: the model is exported, prepared with the engines' precision
  policy (``engines.cleanup.prepare_onnx``), built into an fp16 plan with the contract's profile
  (``engines.build.build_plan``), and checked and timed the same way against PyTorch.

Tolerance (relative to each output's largest magnitude): ``FP16_RTOL`` = 1e-2, the engines' fp16
bar. A UNet's noise prediction is ~N(0, 1) with a max near 4; fp16 rounds at 5e-4 per op and tens
of layers add that up to a few 1e-3, so 1e-2 catches an overflow or a broken fp32 island (those
show as 1e-1 or NaN) without flagging honest fp16 rounding (on the tiny CPU bundle the fp16 ONNX
of every SD-family model stays within 3e-3).

``--device cpu`` runs the PyTorch part on the CPU (time.perf_counter instead of CUDA events), only
to exercise this script where there is no GPU; its figures say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from posterrt.engines.cleanup import FP16_RTOL, prepare_onnx, relative_error
from posterrt.runtime.profiles import model_profile
from posterrt.runtime.contracts import CONTRACTS, STEP
from posterrt.runtime.samples import default_sizes

from .timing import summarize

STEP_MODELS = tuple(name for name, contract in CONTRACTS.items() if contract.role == STEP)


def build_reference(model: str, preset: str):
    """The family's PyTorch module for ``model`` at ``preset`` (random weights unless checkpoints are given)."""
    from posterrt.export.bundle_writer import Sources
    from posterrt.export.registry import MODEL_FAMILY, family_module

    return family_module(MODEL_FAMILY[model]).build(model, preset, Sources())


def to_device(inputs: dict, names, device, half: bool):
    import torch

    tensors = []
    for name in names:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device)
        tensors.append(tensor.half() if half and tensor.is_floating_point() else tensor)
    return tensors


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


def outputs_as_numpy(outputs) -> list[np.ndarray]:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [o.detach().float().cpu().numpy() for o in outputs]


def check_torch(model: str, preset: str, device: str, repeats: int, seed: int) -> dict:
    """PyTorch fp32 vs fp16 on ``device``: parity of fp16 and latency of both.

    fp16 is ``module.half()`` (how diffusers pipelines run in fp16). A module that builds fp32
    tensors inside its forward cannot run that way; it runs under ``torch.autocast`` instead, and
    the result says which (``fp16_mode``)."""
    import torch

    exportable = build_reference(model, preset)
    contract = exportable.contract
    inputs = exportable.inputs(default_sizes("opt"), seed)
    fp32 = exportable.module.eval().to(device)
    args32 = to_device(inputs, contract.input_names, device, half=False)
    with torch.inference_mode():
        expected = outputs_as_numpy(fp32(*args32))
        half = copy.deepcopy(fp32).half()
        args16 = to_device(inputs, contract.input_names, device, half=True)
        try:
            actual = outputs_as_numpy(half(*args16))
            mode, run16 = "half", (lambda: half(*args16))
        except RuntimeError:  # dtype mismatch inside the module
            del half

            def run16():
                with torch.autocast(device_type=device, dtype=torch.float16):
                    return fp32(*args32)

            mode, actual = "autocast", outputs_as_numpy(run16())
        errors = {name: relative_error(a, e) for name, a, e in zip(contract.output_names, actual, expected)}
        timings = {"torch_fp32": time_call(lambda: fp32(*args32), device, repeats),
                   "torch_fp16": time_call(run16, device, repeats)}
    worst = max(errors.values())
    return {"model": model, "preset": preset, "device": device, "sizes": _sizes(contract),
            "parameters": sum(p.numel() for p in fp32.parameters()), "fp16_mode": mode,
            "torch_fp16_vs_fp32": {"max_rel": errors, "tolerance_rel": FP16_RTOL, "passed": worst <= FP16_RTOL},
            "latency": timings, "exportable": exportable, "inputs": inputs, "reference": expected}


def _sizes(contract) -> dict:
    return {k: v for k, v in default_sizes("opt").items() if k in contract.input_dims()}


# ---------------------------------------------------------------------------------------------
# TensorRT (only where it is importable)
# ---------------------------------------------------------------------------------------------
def check_tensorrt(result: dict, repeats: int, work: Path, opt_level: int) -> dict:
    """Export, prepare (fp16 policy), build, then parity against PyTorch fp32 and latency."""
    import tensorrt as trt
    import torch

    from posterrt.engines.build import build_plan, file_logger
    from posterrt.export.onnx_export import export_onnx

    exportable, model = result["exportable"], result["model"]
    contract = exportable.contract
    exportable.module.cpu()  # export traces on the CPU
    source, prepared = work / f"{model}.onnx", work / f"{model}.fp16.onnx"
    began = time.perf_counter()
    export_onnx(exportable, source)
    report = prepare_onnx(source, prepared, model_name=model, precision="fp16")
    logger = file_logger(trt, work / f"{model}.build.log")
    plan, _ = build_plan(trt, prepared, model_profile(contract), precision="fp16", opt_level=opt_level,
                         workspace_gb=8, refittable=False, timing_cache=b"", logger=logger)
    build_seconds = time.perf_counter() - began
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    feeds = dict(zip(contract.input_names, to_device(result["inputs"], contract.input_names, "cuda", half=False)))
    outputs = {}
    for name, tensor in feeds.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name in contract.output_names:
        dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution of {model} failed")

    run()
    torch.cuda.synchronize()
    errors = {name: relative_error(outputs[name].float().cpu().numpy(), expected)
              for name, expected in zip(contract.output_names, result["reference"])}
    logger.close()
    return {"tensorrt_version": trt.__version__, "build_seconds": round(build_seconds, 1), "prepare": report,
            "trt_fp16_vs_torch_fp32": {"max_rel": errors, "tolerance_rel": FP16_RTOL,
                                       "passed": max(errors.values()) <= FP16_RTOL},
            "latency": time_call(run, "cuda", repeats)}


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0),
                    compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    cuda=torch.version.cuda)
    return info


def run_checks(models, presets, device: str, repeats: int, tensorrt: bool, opt_level: int = 3, seed: int = 0,
               log=print) -> dict:
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="posterrt-gpu-check-") as folder:
        for preset in presets:
            for model in models:
                began = time.perf_counter()
                try:
                    result = check_torch(model, preset, device, repeats, seed)
                    if tensorrt:
                        result["tensorrt"] = check_tensorrt(result, repeats, Path(folder), opt_level)
                except Exception as error:  # one model's failure is a finding, not the end of the run
                    result = {"model": model, "preset": preset, "error": f"{type(error).__name__}: {error}"}
                for key in ("exportable", "inputs", "reference"):
                    result.pop(key, None)
                result["seconds"] = round(time.perf_counter() - began, 1)
                rows.append(result)
                log(_line(result))
                if device == "cuda":
                    torch.cuda.empty_cache()
    return {"machine": machine(device), "tensorrt": tensorrt, "fp16_tolerance_rel": FP16_RTOL, "results": rows}


def _line(result: dict) -> str:
    if "error" in result:
        return f"{result['preset']:5s} {result['model']:17s} ERROR {result['error']}"
    latency = result["latency"]
    parity = result["torch_fp16_vs_fp32"]
    text = (f"{result['preset']:5s} {result['model']:17s} torch fp32 {latency['torch_fp32']['p50_ms']:8.2f} ms  "
            f"fp16 ({result['fp16_mode']}) {latency['torch_fp16']['p50_ms']:8.2f} ms  fp16 parity {max(parity['max_rel'].values()):.1e} "
            f"({'ok' if parity['passed'] else 'FAIL'})")
    if "tensorrt" in result:
        trt_result = result["tensorrt"]
        text += (f"  TensorRT fp16 {trt_result['latency']['p50_ms']:8.2f} ms  parity "
                 f"{max(trt_result['trt_fp16_vs_torch_fp32']['max_rel'].values()):.1e}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,paper")
    parser.add_argument("--models", default=",".join(STEP_MODELS), help="per-step models to check")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--opt-level", type=int, default=3)
    parser.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT even where it is installed")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; run on a GPU machine (or --device cpu to exercise the script)",
              file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in CONTRACTS]
    if unknown:
        print(f"error: --models: unknown model(s) {unknown}", file=sys.stderr)
        return 2
    tensorrt = args.device == "cuda" and not args.no_tensorrt and tensorrt_available()
    results = run_checks(models, [p.strip() for p in args.presets.split(",")], args.device, args.repeats, tensorrt,
                         args.opt_level)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    failed = [r for r in results["results"] if "error" in r or not r["torch_fp16_vs_fp32"]["passed"]
              or not r.get("tensorrt", {}).get("trt_fp16_vs_torch_fp32", {}).get("passed", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
