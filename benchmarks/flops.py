"""FLOPs of one call, counted from the ONNX graph: MatMul, Gemm and Conv (attention is MatMuls in
the exported graph). Shapes come from ONNX Runtime's symbolic shape inference with the call's
concrete input shapes, so the count matches the sizes actually benchmarked."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper  # noqa: F401  (keeps onnx's helpers loaded for the inference tool)


def _fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple]) -> None:
    for value in model.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)


def _shape_table(model: onnx.ModelProto) -> dict[str, list]:
    table = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        table[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    return table


COUNTED = ("MatMul", "Gemm", "Conv")


def _inferred_shapes(onnx_path, input_shapes) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(onnx_path), load_external_data=False)
    _fix_input_shapes(model, input_shapes)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    return inferred, _shape_table(inferred)


def _executed_shapes(onnx_path, inputs: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """Shapes seen by running the graph once with the counted nodes' operands exposed as outputs:
    for graphs whose shape arithmetic static inference cannot follow (RoiAlign chains, gathers).

    The weights are never loaded into Python: the edited graph is written beside the original
    (so its external-data references resolve) and removed after the run."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    present = {o.name for o in model.graph.output}
    wanted = []
    for node in model.graph.node:
        if node.op_type in COUNTED:
            wanted += [n for n in list(node.input[:2]) + [node.output[0]] if n and n not in initializers and n not in present]
    for name in dict.fromkeys(wanted):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = onnx_path.with_name(f".{onnx_path.stem}.flops-probe.onnx")
    try:
        onnx.save_model(model, str(probe))
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, dict(inputs))
    finally:
        probe.unlink(missing_ok=True)
    shapes = dict(initializers)
    shapes.update({name: list(value.shape) for name, value in zip(names, values)})
    return model, shapes


def count_flops(onnx_path: str | Path, inputs: Mapping[str, np.ndarray]) -> dict:
    """``{"total": flops, "by_op": {...}, "unknown_nodes": n}`` for one call on ``inputs``."""
    shapes_in = {name: array.shape for name, array in inputs.items()}
    try:
        model, shapes = _inferred_shapes(onnx_path, shapes_in)
        method = "symbolic shape inference"
        result = _count(model, shapes)
        if result["unknown_nodes"] == 0:
            return {**result, "method": method}
    except Exception:  # the inference tool asserts on shape arithmetic it cannot follow
        pass
    model, shapes = _executed_shapes(onnx_path, inputs)
    return {**_count(model, shapes), "method": "shapes from one ONNX Runtime run"}


def _count(model: onnx.ModelProto, shapes: dict) -> dict:
    by_op = {op: 0 for op in COUNTED}
    unknown = 0
    for node in model.graph.node:
        if node.op_type not in by_op:
            continue
        operands = [shapes.get(name) for name in node.input[:2]]
        output = shapes.get(node.output[0])
        if any(s is None or None in s for s in operands + [output]):
            unknown += 1
            continue
        if node.op_type == "Conv":
            weight = operands[1]  # [out, in/group, *kernel]
            flops = 2 * int(np.prod(output)) * int(np.prod(weight[1:]))
        else:
            a = operands[0]
            if node.op_type == "Gemm" and any(att.name == "transA" and att.i for att in node.attribute):
                a = a[::-1]
            k = a[-1]
            flops = 2 * int(np.prod(output)) * int(k)
        by_op[node.op_type] += flops
    return {"total": int(sum(by_op.values())), "by_op": by_op, "unknown_nodes": unknown}
