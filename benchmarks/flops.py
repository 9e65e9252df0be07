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


def count_flops(onnx_path: str | Path, input_shapes: Mapping[str, tuple]) -> dict:
    """``{"total": flops, "by_op": {...}, "unknown_nodes": n}`` for one call at ``input_shapes``."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(onnx_path), load_external_data=False)
    _fix_input_shapes(model, input_shapes)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = _shape_table(inferred)
    by_op = {"MatMul": 0, "Gemm": 0, "Conv": 0}
    unknown = 0
    for node in inferred.graph.node:
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
