"""ONNX clean-up before TensorRT (and ONNX Runtime's GPU providers): constant folding, dead-node and
common-subexpression elimination, standard fusions and shape inference, then the precision policy.

The tracer leaves Shape/Gather/Concat chains and Constant nodes that TensorRT's parser must
otherwise evaluate at build time; folding them and recording every intermediate shape gives the
parser a smaller graph with known ranks. onnxslim does this in one pass. Without it, onnx's shape
inference plus ONNX Runtime's offline *basic* optimizations (constant folding and redundant-node
removal, which emit standard ONNX ops only) do most of the same.

Refit needs the graph of the new weights to be the graph the engine was built from (the refitter
maps weights by name), so optimizations whose result depends on weight *values* are skipped:
weight tying (merging equal initializers) always, and for refittable models also dead-node
elimination (it drops ``Add`` of an all-zero bias, ``Mul`` by all ones: a fresh adapter's zero
weights would vanish from the engine) and common-subexpression elimination (it compares constants).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
import numpy as np
import onnx

from posterrt.runtime.contracts import ModelContract
from posterrt.runtime.errors import BundleError, ParityError
from posterrt.runtime.samples import default_sizes, sample_inputs

from .precision import check_precision, convert_precision, fp32_node_names
from .roi_align import decompose_roi_align

TOOLS = ("auto", "onnxslim", "onnxruntime")
SKIPPED_OPTIMIZATIONS = ("weight_tying",)
SKIPPED_WHEN_REFITTABLE = ("weight_tying", "dead_node_elimination", "subexpression_elimination")
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # a ModelProto must serialize below 2 GB; keep a margin

#: Clean-up must not change the numbers beyond fp32 reassociation (folded constants, fused Conv+BN).
CLEAN_RTOL = 1e-5
#: fp16 against fp32, relative to each output's largest magnitude. fp16 keeps 11 significant bits
#: (5e-4 per rounding); through tens of layers the rounding adds up to a few 1e-3, and the fp32
#: islands keep reductions and embeddings from adding more. 1e-2 is the bar TensorRT's own
#: diffusion demo work and ONNX Runtime's fp16 conversions are commonly checked at.
FP16_RTOL = 1e-2


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"ONNX file {path} does not exist")
    return onnx.load(str(path))  # external data (models past 2 GB) is read from beside the file


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> list[str]:
    """Write ``path``; models past protobuf's 2 GB put their weights in ``<name>.data`` beside it.
    Returns the external data file names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() <= PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return []
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)  # save appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [data_name]


def clean_model(model: onnx.ModelProto, tool: str = "auto", refittable: bool = False) -> tuple[onnx.ModelProto, str]:
    """The cleaned model and the tool that cleaned it."""
    if tool not in TOOLS:
        raise ValueError(f"unknown clean-up tool {tool!r}")
    if tool in ("auto", "onnxslim"):
        try:
            import onnxslim
        except ImportError:
            if tool == "onnxslim":
                raise BundleError("onnxslim is not installed (pip install onnxslim)") from None
        else:
            skipped = SKIPPED_WHEN_REFITTABLE if refittable else SKIPPED_OPTIMIZATIONS
            slimmed = onnxslim.slim(model, skip_optimizations=list(skipped))
            if slimmed is None:
                raise ParityError("onnxslim could not clean the model (its own check failed)")
            return slimmed, f"onnxslim {onnxslim.__version__}"
    return _clean_with_onnxruntime(model), "onnx shape inference + onnxruntime basic optimizations"


def _clean_with_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="posterrt-clean-") as folder:
        source, target = Path(folder) / "source.onnx", Path(folder) / "clean.onnx"
        save_onnx(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        if model.ByteSize() > PROTOBUF_LIMIT:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "clean.onnx.data")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        onnx.shape_inference.infer_shapes_path(str(target), str(target))
        return onnx.load(str(target))


def prepare_onnx(source: str | os.PathLike, target: str | os.PathLike, *, model_name: str,
                 precision: str = "fp32", tool: str = "auto", refittable: bool = False) -> dict:
    """Clean ``source``, apply the precision policy, write ``target``. Returns a report for manifests.

    This is what the TensorRT build, the refit and the gpu-onnx flavor of the Triton repository
    all feed on, so the three see the same graph.
    """
    check_precision(precision)
    started = time.perf_counter()
    original = load_onnx(source)
    nodes_before = len(original.graph.node)
    cleaned, used_tool = clean_model(original, tool, refittable)
    del original
    roi_aligns = decompose_roi_align(cleaned)  # TensorRT would need its ROIAlign_TRT plugin otherwise
    fp32_nodes = fp32_node_names(cleaned, model_name) if precision != "fp32" else []
    converted = convert_precision(cleaned, precision, model_name)
    data_files = save_onnx(converted, target)
    return {"source": str(source), "file": Path(target).name, "data_files": data_files, "tool": used_tool,
            "skipped_optimizations": list(SKIPPED_WHEN_REFITTABLE if refittable else SKIPPED_OPTIMIZATIONS),
            "refittable": refittable, "precision": precision,
            "nodes_before": nodes_before, "nodes_after": len(converted.graph.node),
            "fp32_nodes": len(fp32_nodes), "roi_aligns_rewritten": roi_aligns,
            "seconds": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------------------------------------
# Parity in ONNX Runtime (CPU): the cleaned / converted graph against the exported one
# ---------------------------------------------------------------------------------------------
#: Entries at or past this magnitude are mask constants by design (PlanNet's invalid logits and
#: padding biases are -1e4), not signal: they do not set an output's scale (the error still covers them).
MASK_MAGNITUDE = 1e4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (mask constants excluded from the scale);
    NaN where both are NaN counts as equal, NaN on one side only as infinitely wrong."""
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if not expected.size:
        return 0.0
    if np.any(np.isnan(actual) != np.isnan(expected)):
        return float("inf")
    both_nan = np.isnan(expected)
    diff = np.abs(np.where(both_nan, 0.0, actual - expected)).max()
    magnitude = np.abs(np.where(both_nan, 0.0, expected))
    signal = magnitude[magnitude < MASK_MAGNITUDE]
    scale = signal.max() if signal.size else magnitude.max()
    return float(diff / max(scale, 1e-12))


def compare_onnx(reference: str | os.PathLike, candidate: str | os.PathLike, contract: ModelContract, *,
                 rtol: float, seed: int | None = None, size_kinds=("small", "other")) -> dict:
    """Run both graphs on the same random inputs (two sizes of every dynamic axis) in ONNX Runtime."""
    import onnxruntime as ort

    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for path in (reference, candidate)]
    worst, runs = 0.0, []
    for index, kind in enumerate(size_kinds):
        inputs = sample_inputs(contract, default_sizes(kind), seed + index)
        expected, actual = (session.run(contract.output_names, inputs) for session in sessions)
        errors = {}
        for name, got, want in zip(contract.output_names, actual, expected):
            if got.shape != want.shape:
                raise ParityError(f"{contract.name}: output {name!r} has shape {got.shape} after clean-up, {want.shape} before")
            errors[name] = relative_error(got, want)
        worst = max(worst, *errors.values())
        runs.append({"sizes": kind, "max_rel": errors})
    return {"seed": seed, "tolerance_rel": rtol, "max_rel": worst, "passed": worst <= rtol, "runs": runs}
