"""Would TensorRT 10.x's ONNX parser take this graph? A check against its published operator table.

Every node of an exported graph is held to ``engines/tensorrt_onnx_table.py`` (onnx-tensorrt's
``docs/operators.md``): the operator must be listed as supported, the tensor that carries its type
must have one of the listed types (types from ONNX shape inference), and the restrictions of the
operators posterrt emits are checked on their attributes and inputs (constant ``axes``, Resize
modes, pooling dilations, ...). Graph-level: the opset, custom domains, graph input/output types.

Finding levels, worst first:

* ``rejected``: the parser would refuse the graph (or the table says it does).
* ``plugin``: the parser imports the operator through one of TensorRT's own plugins
  (``libnvinfer_plugin``, shipped with TensorRT), not a native layer: the build must load that
  library (``engines build`` does) and so must whatever deserializes the plan.
* ``rewrite``: ``prepare_onnx`` (what ``engines build``, ``refit`` and the gpu-onnx flavor feed on)
  replaces it with plain operators first (RoiAlign: ``engines/roi_align.py``), so no plugin is needed.
* ``warning``: accepted, with a caveat worth knowing (data-dependent output shapes, DOUBLE cast down).
* ``unchecked``: a restriction of the table this module does not verify automatically.

It runs on every ``posterrt export`` (``tensorrt_ops.json`` in the bundle and one summary line) and
before every ``posterrt engines build`` (on the cleaned ONNX the parser actually gets).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

from .roi_align import rewritable
from .tensorrt_onnx_table import (IO_ONLY_TYPES, IO_TYPES, NOT_SUPPORTED, OPSET_RANGE, RESTRICTIONS, SUPPORTED,
                                  TABLE_SOURCE, TABLE_TENSORRT)

REPORT_FILE = "tensorrt_ops.json"
LEVELS = ("rejected", "plugin", "rewrite", "warning", "unchecked")

#: onnx-tensorrt imports these through a TensorRT plugin (onnxOpImporters.cpp, 10.1 GA: RoiAlign ->
#: ``ROIAlign_TRT`` version 2, looked up in the plugin registry; "plugin was not found" otherwise).
PLUGIN_OPS = {"RoiAlign": "ROIAlign_TRT"}
#: Output shape set by the values, not the input shapes: TensorRT needs an output allocator where
#: one reaches a graph output, and ONNX Runtime's TensorRT provider leaves them to CUDA.
DATA_DEPENDENT_OPS = ("NonZero", "NonMaxSuppression")
#: The input (or output) whose type the table's "Supported Types" column is about; default input 0.
TYPED_TENSOR = {"Where": ("input", 1), "Constant": ("output", 0), "ConstantOfShape": ("output", 0),
                "RandomNormal": ("output", 0), "RandomUniform": ("output", 0), "Cast": ("both", 0),
                "CastLike": ("both", 0)}

_TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4"}
_RESIZE = {"coordinate_transformation_mode": ("half_pixel", ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                               "asymmetric", "align_corners")),
           "mode": ("nearest", ("nearest", "linear")),
           "nearest_mode": ("round_prefer_floor", ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")),
           "keep_aspect_ratio_policy": ("stretch", ("stretch",))}
_REDUCE = tuple(op for op in SUPPORTED if op.startswith("Reduce"))


def type_name(elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type)
    return _TYPE_NAMES.get(name, name)


class GraphFacts:
    """What the checks need to know about one graph: tensor types and ranks, constants, users."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.graph = graph
        self.types, self.ranks, self.static = {}, {}, {}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            tensor = value.type.tensor_type
            if tensor.elem_type:
                self.types[value.name] = type_name(tensor.elem_type)
            if tensor.HasField("shape"):
                self.ranks[value.name] = len(tensor.shape.dim)
                self.static[value.name] = all(d.HasField("dim_value") for d in tensor.shape.dim)
        self.values = {}
        for tensor in graph.initializer:
            self.types[tensor.name] = type_name(tensor.data_type)
            self.values[tensor.name] = tensor
        self.constants = set(self.values)
        for node in graph.node:  # in graph order: constant folding's view of "build-time constant"
            if node.op_type == "Constant":
                self.constants.update(node.output)
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.values[node.output[0]] = attribute.t
                        self.types[node.output[0]] = type_name(attribute.t.data_type)
            elif node.input and all(not name or name in self.constants for name in node.input) \
                    and not node.op_type.startswith("Random"):
                self.constants.update(node.output)
        self.used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    def value(self, name: str):
        tensor = self.values.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _attribute(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _constant_input(node, index, facts, what) -> list[str]:
    if len(node.input) > index and node.input[index] and node.input[index] not in facts.constants:
        return [f"{what} is computed at run time; TensorRT needs a build-time constant"]
    return []


def _restriction_failures(node, facts: GraphFacts) -> list[str] | None:
    """Why ``node`` breaks its operator's restrictions (empty: it does not); None: not checked here."""
    op = node.op_type
    if op in ("AveragePool", "MaxPool", "LpPool"):
        failures = []
        if any(d != 1 for d in _attribute(node, "dilations", [])):
            failures.append(f"dilations {_attribute(node, 'dilations')} (must be empty or all ones)")
        if op != "LpPool" and len(_attribute(node, "kernel_shape", [])) not in (2, 3):
            failures.append(f"{len(_attribute(node, 'kernel_shape', []))}D pooling (2D or 3D only)")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1] in facts.used:
            failures.append("its Indices output is used (unsupported)")
        return failures
    if op == "Constant":
        return [f"attribute {a.name}" for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    if op == "CumSum":
        return _constant_input(node, 1, facts, "`axis`")
    if op == "Dropout":
        return _constant_input(node, 2, facts, "`training_mode`")
    if op == "GridSample":
        rank = facts.ranks.get(node.input[0])
        return [f"input of rank {rank} (must be 4D)"] if rank not in (None, 4) else []
    if op == "LayerNormalization":
        return ["its Mean/InvStdDev outputs are used (only Y is supported)"] \
            if any(name in facts.used for name in node.output[1:]) else []
    if op == "LSTM":
        return [f"{name}={_attribute(node, name)} (must be 0)" for name in ("input_forget", "layout") if _attribute(node, name, 0)]
    if op == "OneHot":
        return _constant_input(node, 1, facts, "`depth`")
    if op in _REDUCE:
        return _constant_input(node, 1, facts, "`axes`")
    if op == "Resize":
        failures = [f"{name}={_text(_attribute(node, name, default))!r} (supported: {', '.join(allowed)})"
                    for name, (default, allowed) in _RESIZE.items() if _text(_attribute(node, name, default)) not in allowed]
        return failures + (["antialias=1 (not supported)"] if _attribute(node, "antialias", 0) else [])
    if op == "ScatterND":
        reduction = _text(_attribute(node, "reduction", "none"))
        return [f"reduction={reduction!r} (only 'none')"] if reduction != "none" else []
    if op in ("Squeeze", "Unsqueeze"):
        return _constant_input(node, 1, facts, "`axes`")
    if op == "TopK":
        failures = [] if _attribute(node, "sorted", 1) == 1 else ["sorted=0 (must be 1)"]
        k = facts.value(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(k.reshape(-1)[0]) >= 3840:
            failures.append(f"K={int(k.reshape(-1)[0])} (must be below 3840)")
        return failures
    if op in ("QuantizeLinear", "DequantizeLinear"):
        zero = facts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return ["a non-zero zero point"] if zero is not None and zero.any() else []
    if op == "EyeLike":
        return [] if facts.static.get(node.input[0], True) else ["an input with dynamic dimensions"]
    return None


def _typed_tensors(node) -> list[tuple[str, str]]:
    where, index = TYPED_TENSOR.get(node.op_type, ("input", 0) if node.input else ("output", 0))
    tensors = []
    if where in ("input", "both") and len(node.input) > index:
        tensors.append(("input", node.input[index]))
    if where in ("output", "both") and len(node.output) > index:
        tensors.append(("output", node.output[index]))
    return [(kind, name) for kind, name in tensors if name]


def _node_findings(node, facts: GraphFacts) -> list[tuple[str, str]]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return [("rejected", f"custom operator {node.domain}::{op}: TensorRT would need a plugin of that name")]
    if op in NOT_SUPPORTED:
        return [("rejected", "listed as not supported")]
    if op not in SUPPORTED:
        return [("rejected", "not in the table")]
    findings = []
    for kind, name in _typed_tensors(node):
        dtype = facts.types.get(name)
        if dtype is not None and (dtype not in SUPPORTED[op] or dtype in IO_ONLY_TYPES):
            findings.append(("rejected", f"{kind} type {dtype} (supported: {', '.join(SUPPORTED[op])})"))
    failures = _restriction_failures(node, facts)
    if failures is None and op in RESTRICTIONS:
        findings.append(("unchecked", f"restriction not checked here: {RESTRICTIONS[op]}"))
    findings += [("rejected", f"{failure}: {RESTRICTIONS[op]}") for failure in failures or ()]
    if op in PLUGIN_OPS and rewritable(node):
        findings.append(("rewrite", f"the parser would import it as TensorRT's {PLUGIN_OPS[op]} plugin; prepare_onnx "
                                    f"rewrites it into plain operators first (engines/roi_align.py)"))
    elif op in PLUGIN_OPS:
        findings.append(("plugin", f"imported as TensorRT's {PLUGIN_OPS[op]} plugin (libnvinfer_plugin), not a native layer"))
    if op in DATA_DEPENDENT_OPS:
        findings.append(("warning", "output shape depends on the values (needs an output allocator at a graph output)"))
    return findings


def check_model(model: onnx.ModelProto, name: str = "") -> dict:
    """The report for one graph (``model`` is shape-inferred here; weights are not needed)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # a graph ONNX cannot type is a finding, not a crash of the export
        inferred, inference_error = model, f"{type(error).__name__}: {error}"
    else:
        inference_error = None
    facts = GraphFacts(inferred)
    graph = inferred.graph
    grouped: dict[tuple, dict] = {}

    def add(level, op, message, node_name=""):
        entry = grouped.setdefault((level, op, message), {"level": level, "op": op, "message": message, "count": 0,
                                                           "first_node": node_name})
        entry["count"] += 1

    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        add("rejected", "", f"opset {opset} (TensorRT {TABLE_TENSORRT} imports opsets {OPSET_RANGE[0]}..{OPSET_RANGE[1]})")
    if inference_error:
        add("warning", "", f"ONNX shape inference failed, types not checked: {inference_error}")
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            dtype = facts.types.get(value.name)
            if dtype == "DOUBLE":
                add("warning", "", f"graph {kind} {value.name!r} is DOUBLE: TensorRT casts it to FLOAT, clamping")
            elif dtype is not None and dtype not in IO_TYPES:
                add("rejected", "", f"graph {kind} {value.name!r} has type {dtype} (TensorRT I/O: {', '.join(IO_TYPES)})")
    for node in graph.node:
        for level, message in _node_findings(node, facts):
            add(level, node.op_type, message, node.name)
    findings = sorted(grouped.values(), key=lambda f: (LEVELS.index(f["level"]), f["op"], f["message"]))
    levels = {f["level"] for f in findings}
    verdict = "rejected" if "rejected" in levels else "plugin" if "plugin" in levels else "clean"
    return {"model": name, "table": TABLE_SOURCE, "opset": opset, "nodes": len(graph.node),
            "operators": dict(sorted(Counter(n.op_type for n in graph.node).items())),
            "plugins": sorted({PLUGIN_OPS[n.op_type] for n in graph.node if n.op_type in PLUGIN_OPS and not rewritable(n)}),
            "rewritten": sorted({n.op_type for n in graph.node if n.op_type in PLUGIN_OPS and rewritable(n)}),
            "verdict": verdict, "findings": findings}


def check_file(path: str | Path, name: str = "") -> dict:
    """:func:`check_model` of an ONNX file; external weights (models past 2 GB) are not read."""
    return check_model(onnx.load(str(path), load_external_data=False), name or Path(path).stem)


def blocking(report: dict) -> list[str]:
    """One line per rejected finding of a report."""
    return [f"{f['op'] or 'graph'}: {f['message']} ({f['count']} node(s), first {f['first_node'] or '-'})"
            for f in report["findings"] if f["level"] == "rejected"]


def summary_line(reports: dict) -> str:
    """One line for a whole bundle: ``{model: report}``."""
    by_verdict = {}
    for model, report in reports.items():
        by_verdict.setdefault(report["verdict"], []).append(model)
    parts = [f"{len(by_verdict.get('clean', []))} of {len(reports)} models clean"]
    parts += [f"{model} needs {', '.join(reports[model]['plugins'])}" for model in by_verdict.get("plugin", [])]
    parts += [f"{model}'s {', '.join(report['rewritten'])} rewritten plugin-free by prepare_onnx"
              for model, report in reports.items() if report.get("rewritten")]
    parts += [f"{model} REJECTED ({blocking(reports[model])[0]})" for model in by_verdict.get("rejected", [])]
    return f"TensorRT {TABLE_TENSORRT} ONNX parser table: " + "; ".join(parts)


def write_bundle_report(folder: Path, models: dict, previous: dict | None = None) -> dict:
    """``folder/tensorrt_ops.json`` for the ONNX files ``{model: file name}`` in ``folder``; entries
    of ``previous`` (the bundle's earlier report) for other models are kept. Returns the reports."""
    reports = dict((previous or {}).get("models", {}))
    reports.update({model: check_file(Path(folder) / file, model) for model, file in models.items()})
    reports = dict(sorted(reports.items()))
    (Path(folder) / REPORT_FILE).write_text(json.dumps({"table": TABLE_SOURCE, "summary": summary_line(reports),
                                                        "models": reports}, indent=2))
    return reports
