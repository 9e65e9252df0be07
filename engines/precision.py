"""Mixed precision written into the ONNX graph: the precision policy of both GPU paths.

Why in the graph, not in builder flags: TensorRT 10.12 deprecated weakly typed builds
(``BuilderFlag.FP16`` plus per-layer precision hints) and TensorRT 11 removed them; a strongly typed
network takes every tensor's type from the graph. So fp16/bf16 is a property of the ONNX we hand
TensorRT (and ONNX Runtime's TensorRT / CUDA providers): the float weights and activations are
converted with ONNX Runtime's fp16 converter (``onnxruntime.transformers.float16``), except the
nodes listed by :func:`fp32_node_names`, which stay fp32 with casts around them. Graph inputs and
outputs stay fp32, so the contracts hold.

The converter casts around each kept node separately, so two kept nodes in a row still pass their
tensor through fp16 between them, and constants feeding a kept node are stored in fp16 and cast
back. :func:`_repair_round_trips` removes both losses: a cast to fp16 followed by a cast back to
fp32 becomes the fp32 tensor itself, and a constant cast back to fp32 gets its original fp32 value.

What stays fp32, and why:
* normalizations (GroupNorm is exported as InstanceNormalization, LayerNorm, their decomposed
  ReduceMean/Pow/Sqrt form) and Softmax: their reductions overflow or lose the small variance in
  fp16 (the VAE decoder's GroupNorm at 512x512 is the classic case);
* the elementwise chain feeding Sin/Cos (timestep embeddings, RADM's GRAM geometry):
  ``timestep * freq`` reaches 1000 radians, where fp16 resolves only 0.5, so sin/cos of it is noise;
* per model, name patterns (the VAE decoder's mid-block attention, whose scores overflow fp16);
* the converter's own block list (RoiAlign, Resize, TopK, Range, ...): ops whose fp16 kernels are
  missing or whose index/scale inputs must stay fp32.

bf16 keeps the same structure and islands (bf16 has fp32's range, but the reductions still want
fp32 accumulation); it is written by re-typing the fp16 graph, with each weight rounded from its
fp32 original. Opset 17 does not list bf16 for Conv, so ONNX Runtime refuses a bf16 graph: bf16 is
for TensorRT engines only (whose ONNX parser builds the typed network itself).
"""
from __future__ import annotations

import re

import onnx

from posterrt.runtime.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16")

FP32_OP_TYPES = ("Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
                 "ReduceMean", "Pow", "Sqrt", "Sin", "Cos")

#: Cheap ops walked upstream from Sin/Cos: the whole embedding arithmetic stays fp32, but the walk
#: stops at anything heavier (MatMul, Conv, Gemm), so fp32 never spreads into the network's body.
_ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Clip", "Max", "Min", "Sqrt", "Pow",
                    "Reciprocal", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Concat", "Slice", "Gather",
                    "Transpose", "Flatten", "Tile", "Where", "Identity", "Floor", "Ceil", "Round"}

#: Extra node-name patterns kept fp32 per served model (names are torch.onnx's module paths), and
#: for every model: the plugin-free RoiAlign (engines/roi_align.py), whose pixel coordinates reach
#: 1024, where fp16 resolves half a pixel.
FP32_NAME_PATTERNS = {
    "vae_decoder": (r"mid_block/attentions",),
}
FP32_NAME_PATTERNS_EVERY_MODEL = (r"^roi_align_plugin_free/",)

#: Constants are clamped to +-1e4 in fp16: masks of -1e4 survive, while a larger constant (-1e9
#: "minus infinity" masks) would become -inf and turn a fully masked softmax row into NaN.
FP16_MAX_CONSTANT = 1e4


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise InputError(f"--precision: unknown precision {value!r}; expected one of {', '.join(PRECISIONS)}")
    return value


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a stable name: the converter's block list matches by name."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def fp32_node_names(model: onnx.ModelProto, model_name: str = "") -> list[str]:
    """Names of the nodes the policy keeps in fp32 (see the module docstring)."""
    _name_nodes(model)
    producer = {output: node for node in model.graph.node for output in node.output}
    keep = {node.name for node in model.graph.node if node.op_type in FP32_OP_TYPES}
    patterns = [re.compile(p) for p in (*FP32_NAME_PATTERNS.get(model_name, ()), *FP32_NAME_PATTERNS_EVERY_MODEL)]
    keep |= {node.name for node in model.graph.node if any(p.search(node.name) for p in patterns)}
    pending = [node for node in model.graph.node if node.op_type in ("Sin", "Cos")]
    while pending:
        node = pending.pop()
        for name in node.input:
            parent = producer.get(name)
            if parent is not None and parent.op_type in _ELEMENTWISE_OPS and parent.name not in keep:
                keep.add(parent.name)
                pending.append(parent)
    return sorted(keep)


def convert_precision(model: onnx.ModelProto, precision: str, model_name: str = "") -> onnx.ModelProto:
    """The model with float tensors in ``precision`` except the fp32 islands; I/O stays fp32.

    Converts in place (a paper-size UNet is GBs; no copy is made): the caller's ``model`` is
    consumed. Only what the repair and the bf16 re-rounding need is kept aside first."""
    check_precision(precision)
    if precision == "fp32":
        return model
    from onnxruntime.transformers import float16

    keep = set(fp32_node_names(model, model_name))
    kept_inputs = {name for node in model.graph.node if node.name in keep for name in node.input}
    island_constants = _float_constants(model, kept_inputs)
    bf16_weights = _float_constants(model, None, as_bf16=True) if precision == "bf16" else None
    disable_shape_infer = _too_big_for_shape_inference(model)
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, max_finite_val=FP16_MAX_CONSTANT,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST), node_block_list=sorted(keep),
        disable_shape_infer=disable_shape_infer)
    _repair_round_trips(converted, island_constants, keep)
    if precision == "bf16":
        _retype_fp16_as_bf16(converted, bf16_weights)
    return converted


def _float_constants(model: onnx.ModelProto, names: set | None, as_bf16: bool = False) -> dict:
    """fp32 values (or their bf16 rounding) of float initializers and Constant nodes, by tensor
    name; only those in ``names`` unless it is None."""
    from onnx import numpy_helper

    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(node.output[0], attribute.t) for node in model.graph.node if node.op_type == "Constant"
                for attribute in node.attribute if attribute.name == "value"]
    values = {}
    for name, tensor in tensors:
        if tensor.data_type == onnx.TensorProto.FLOAT and (names is None or name in names):
            array = numpy_helper.to_array(tensor)
            values[name] = _to_bf16(array) if as_bf16 else array
    return values


def _to_bf16(array):
    import ml_dtypes  # a dependency of onnx itself

    return array.astype(ml_dtypes.bfloat16)


def _repair_round_trips(converted: onnx.ModelProto, originals: dict, keep: set[str]) -> None:
    """Give the fp32 islands their fp32 inputs back (see the module docstring); in place."""
    from onnx import numpy_helper

    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    graph = converted.graph
    producer = {output: node for node in graph.node for output in node.output}
    fp32_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == FLOAT}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def is_fp32(tensor: str) -> bool:
        # fp32 tensors of the converted graph: fp32 graph inputs, outputs of kept nodes, casts to fp32
        parent = producer.get(tensor)
        if parent is None:
            return tensor in fp32_inputs
        return parent.name in keep or cast_to(parent) == FLOAT

    replacements: dict[str, str] = {}  # output of a cast back to fp32 -> the tensor to use instead
    existing = {t.name for t in graph.initializer}
    for node in graph.node:
        if cast_to(node) != FLOAT:
            continue
        source = node.input[0]
        down = producer.get(source)
        if down is not None and cast_to(down) == FLOAT16 and is_fp32(down.input[0]):
            replacements[node.output[0]] = down.input[0]
        elif source in originals:  # a constant the converter stored in fp16
            name = f"{source}__fp32"
            if name not in existing:
                graph.initializer.append(numpy_helper.from_array(originals[source].astype("float32"), name))
                existing.add(name)
            replacements[node.output[0]] = name
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replacements:
                node.input[index] = replacements[name]
    _remove_dead_nodes(converted)
    _topological_sort(converted.graph)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The converter appends its casts at the end; ONNX wants producers before consumers."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        assert ready, "the converted graph has a cycle or an undefined input"
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    sorted_nodes = [onnx.NodeProto() for _ in ordered]
    for target, node in zip(sorted_nodes, ordered):
        target.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _too_big_for_shape_inference(model: onnx.ModelProto) -> bool:
    # onnx's in-memory shape inference serializes the model: impossible past protobuf's 2 GB.
    return model.ByteSize() > (2 << 30) - (64 << 20)


def _retype_fp16_as_bf16(converted: onnx.ModelProto, bf16_weights: dict) -> None:
    """Turn the fp16 graph into a bf16 one, in place: same structure and fp32 islands, every FLOAT16
    becomes BFLOAT16, and each weight is the bf16 rounding of its fp32 original (not of the fp16 copy)."""
    import numpy as np
    from onnx import numpy_helper

    FP16, BF16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    for index, tensor in enumerate(converted.graph.initializer):
        if tensor.data_type == FP16:
            values = bf16_weights.get(tensor.name)
            if values is None:
                values = _to_bf16(numpy_helper.to_array(tensor).astype(np.float32))
            converted.graph.initializer[index].CopyFrom(_bf16_tensor(values, tensor.name))
    for node in converted.graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == FP16:
                attribute.i = BF16
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FP16:
                values = bf16_weights.get(node.output[0])
                if values is None:
                    values = _to_bf16(numpy_helper.to_array(attribute.t).astype(np.float32))
                attribute.t.CopyFrom(_bf16_tensor(values, attribute.t.name))
    for value in list(converted.graph.value_info) + list(converted.graph.input) + list(converted.graph.output):
        if value.type.tensor_type.elem_type == FP16:
            value.type.tensor_type.elem_type = BF16


def _bf16_tensor(values, name: str) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, values.shape,
                                   values.view("uint16").tobytes(), raw=True)
