"""Per served model: one call at batch 1 and at the CFG batch, PyTorch eager vs ONNX Runtime (and
OpenVINO at f32 on the same ONNX, when asked), interleaved after warm-up, with the call's FLOPs from
the ONNX graph and the achieved GFLOP/s."""
from __future__ import annotations

from typing import Iterable

from tqdm import tqdm

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.samples import default_sizes, sample_inputs

from .flops import count_flops
from .timing import interleaved

BATCH_AXES = ("batch", "cfg_batch", "text_rows")


def bench_sizes(image_size: int, batch: int) -> dict[str, int]:
    sizes = default_sizes("opt")
    sizes.update(height=image_size, width=image_size)
    for axis in BATCH_AXES:
        sizes[axis] = batch
    return sizes


def bench_models(bundle: Bundle, models: Iterable[str], image_size: int, backends: list[str],
                 batches=(1, 2), repeats: int = 5, warmup: int = 1, threads: int | None = None) -> list[dict]:
    """One row per (model, batch). ``backends`` is a subset of ('torch', 'ort', 'openvino')."""
    from posterrt.runtime.backends.onnxruntime import OrtBackend

    ort_backend = OrtBackend(bundle, intra_op_threads=threads) if "ort" in backends else None
    openvino_sessions = {}
    torch_ready = "torch" in backends and _import_torch(threads)
    rows = []
    progress = tqdm(list(models), desc="models", unit="model")
    for name in progress:
        progress.set_postfix_str(name)
        # With torch, inputs come from the export side (valid boxes for radm_head, ...).
        exportable = _build(bundle, name) if torch_ready else None
        for batch in batches:
            sizes = bench_sizes(image_size, batch)
            inputs = (exportable.inputs(sizes, seed=batch) if exportable is not None
                      else sample_inputs(bundle.contract(name), sizes, seed=batch))
            shapes = {k: v.shape for k, v in inputs.items()}
            flops = count_flops(bundle.model_path(name), inputs)
            candidates = {}
            if ort_backend is not None:
                candidates["ort"] = lambda: ort_backend.run(name, inputs)
            if torch_ready:
                candidates["torch"] = _torch_call(exportable, inputs)
            if "openvino" in backends:
                session = openvino_sessions.get(name) or openvino_sessions.setdefault(name, _openvino(bundle, name, threads))
                candidates["openvino"] = (lambda s, i: lambda: s.run(None, i))(session, inputs)
            timings = interleaved(candidates, repeats=repeats, warmup=warmup)
            row = {"model": name, "batch": batch, "image_size": image_size, "shapes": {k: list(v) for k, v in shapes.items()},
                   "gflop": flops["total"] / 1e9, "flops_unknown_nodes": flops["unknown_nodes"], "latency": timings}
            for backend, stats in timings.items():
                row[f"{backend}_gflops"] = flops["total"] / 1e9 / (stats["p50_ms"] / 1e3)
            if "torch" in timings and "ort" in timings:
                row["ort_speedup_vs_torch"] = timings["torch"]["p50_ms"] / timings["ort"]["p50_ms"]
            if "torch" in timings and "openvino" in timings:
                row["openvino_speedup_vs_torch"] = timings["torch"]["p50_ms"] / timings["openvino"]["p50_ms"]
            rows.append(row)
        del exportable
        openvino_sessions.pop(name, None)  # one model's compiled graph at a time (paper UNets are GBs)
    if ort_backend is not None:
        ort_backend.close()
    return rows


def _openvino(bundle: Bundle, name: str, threads: int | None):
    """OpenVINO on the exported ONNX itself, at f32: the fp32 engine comparison (the bf16 form is
    the ``openvino-bf16`` variant, benchmarked by ``benchmarks/unet_step.py``)."""
    from posterrt.runtime.backends.openvino import OpenVinoSession

    return OpenVinoSession(bundle.model_path(name), threads)


def _import_torch(threads):
    try:
        import torch
    except ImportError:
        return False
    if threads:
        torch.set_num_threads(threads)
    return True


def _build(bundle: Bundle, name: str):
    """The reference module with the bundle's weights: family builds are deterministic per preset."""
    from posterrt.export.bundle_writer import Sources
    from posterrt.export.registry import MODEL_FAMILY, family_module

    return family_module(MODEL_FAMILY[name]).build(name, bundle.preset, Sources())


def _torch_call(exportable, inputs):
    import torch

    module = exportable.module.eval()
    args = tuple(torch.from_numpy(inputs[n]) for n in exportable.contract.input_names)

    def run():
        with torch.inference_mode():
            return module(*args)

    return run
