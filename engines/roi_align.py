"""RoiAlign rewritten into plain ONNX operators, so TensorRT needs no plugin for it.

TensorRT's ONNX parser imports ``RoiAlign`` as the ``ROIAlign_TRT`` plugin of ``libnvinfer_plugin``
(engines/onnx_operators.py). This rewrite gives it MatMuls instead, exactly ONNX's (and ONNX
Runtime's) average-mode RoiAlign:

Bilinear sampling is separable, and so is the validity of a sample point (a point is dropped when
its y *or* its x is outside [-1, size]) and the average over a bin's ``s x s`` points. So per box
``r`` one matrix per axis, ``Ay[r]`` (out_h x H) and ``Ax[r]`` (out_w x W), holds the averaged
interpolation weights, and ``Y[r, c] = Ay[r] @ X[batch[r], c] @ Ax[r]^T``. The box's image is picked
by folding a one-hot of its batch index into ``Ay`` (over the stacked ``B*H`` rows), so ``X`` is never
gathered per box. Memory: one ``[R, C, out_h, W]`` intermediate (R boxes, C channels).

Only what posterrt emits is rewritten: ``mode="avg"`` and a fixed ``sampling_ratio`` > 0 (the
adaptive ratio depends on each box's size, a data-dependent loop count). The rewritten nodes are
named ``roi_align_plugin_free/...``; the precision policy keeps them in fp32 (their pixel
coordinates reach 1024, where fp16 resolves half a pixel).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "roi_align_plugin_free"


def _attribute(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def rewritable(node: onnx.NodeProto) -> bool:
    return (node.op_type == "RoiAlign" and _attribute(node, "mode", "avg") == "avg"
            and _attribute(node, "sampling_ratio", 0) > 0)


class _Builder:
    """Appends named nodes and constants for one RoiAlign node."""

    def __init__(self, tag: str):
        self.tag, self.nodes, self.constants, self.count = tag, [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}/{self.tag}/{hint}_{self.count}"

    def const(self, hint: str, value, dtype=np.float32) -> str:
        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, hint: str = "", outputs=None, **attributes) -> str:
        name = self.name(hint or op_type)
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attributes))
        return outputs[0]


def _axis_weights(b: _Builder, start: str, length: str, size_f: str, size_i: str, out: int, ratio: int) -> str:
    """[R, out, size]: the averaged bilinear weights of one axis for every box."""
    bin_size = b.op("Div", [length, b.const("out", float(out))], "bin")
    # point k = bin * ratio + i of a box: start + bin * bin_size + (i + 0.5) * bin_size / ratio, with
    # ONNX Runtime's order of float operations (coordinates reach 1e3: a reordering moves a point by
    # 1e-5 pixel, which a deep head turns into 1e-5 of its logits)
    k = np.arange(out * ratio)
    whole = b.op("Mul", [b.const("bins", (k // ratio)[None, :].astype(np.float32)), bin_size], "whole_bins")
    within = b.op("Div", [b.op("Mul", [b.const("within", (k % ratio + 0.5)[None, :].astype(np.float32)), bin_size]),
                          b.const("ratio", float(ratio))], "within_bin")
    points = b.op("Add", [b.op("Add", [start, whole]), within], "points")  # [R, out*ratio]
    valid = b.op("Cast", [b.op("And", [b.op("GreaterOrEqual", [points, b.const("minus_one", -1.0)]),
                                       b.op("LessOrEqual", [points, size_f])])], "valid", to=TensorProto.FLOAT)
    clamped = b.op("Max", [points, b.const("zero", 0.0)], "clamped")
    last = b.op("Sub", [size_f, b.const("one", 1.0)], "last")
    at_edge = b.op("GreaterOrEqual", [b.op("Floor", [clamped]), last], "at_edge")
    position = b.op("Where", [at_edge, last, clamped], "position")
    low = b.op("Floor", [position], "low")
    high = b.op("Where", [at_edge, last, b.op("Add", [low, b.const("one", 1.0)])], "high")
    frac = b.op("Sub", [position, low], "frac")
    w_high = b.op("Mul", [frac, valid], "w_high")
    w_low = b.op("Mul", [b.op("Sub", [b.const("one", 1.0), frac]), valid], "w_low")
    grid = b.op("Cast", [b.op("Range", [b.const("zero_i", 0, np.int64), size_i, b.const("one_i", 1, np.int64)])],
                "grid", to=TensorProto.FLOAT)  # [size]

    def spread(index, weight):  # [R, n] -> [R, n, size]: weight at column index
        hits = b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [index, b.const("axis", [2], np.int64)]), grid])],
                    to=TensorProto.FLOAT)
        return b.op("Mul", [hits, b.op("Unsqueeze", [weight, b.const("axis", [2], np.int64)])])

    weights = b.op("Add", [spread(low, w_low), spread(high, w_high)], "weights")  # [R, out*ratio, size]
    per_bin = b.op("Reshape", [weights, b.const("shape", [0, out, ratio, -1], np.int64)], "per_bin")
    return b.op("ReduceMean", [per_bin], "averaged", axes=[2], keepdims=0)  # [R, out, size]


def _replacement(node: onnx.NodeProto, tag: str) -> _Builder:
    features, rois, batch_index = node.input[:3]
    out_h, out_w = _attribute(node, "output_height", 1), _attribute(node, "output_width", 1)
    ratio, scale = _attribute(node, "sampling_ratio", 0), _attribute(node, "spatial_scale", 1.0)
    half_pixel = _attribute(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel"
    b = _Builder(tag)
    shape = b.op("Shape", [features], "shape")

    def dim(index):  # (int64 [1], float scalar)
        as_int = b.op("Slice", [shape, b.const("s", [index], np.int64), b.const("e", [index + 1], np.int64)], "dim")
        return as_int, b.op("Cast", [b.op("Squeeze", [as_int])], to=TensorProto.FLOAT)

    (batch_i, _), (height_i, height_f), (width_i, width_f) = dim(0), dim(2), dim(3)
    scaled = b.op("Sub", [b.op("Mul", [rois, b.const("scale", scale)]), b.const("offset", 0.5 if half_pixel else 0.0)])

    def column(index):  # [R, 1]
        return b.op("Slice", [scaled, b.const("s", [index], np.int64), b.const("e", [index + 1], np.int64),
                              b.const("a", [1], np.int64)], "column")

    x1, y1, x2, y2 = (column(i) for i in range(4))
    width, height = b.op("Sub", [x2, x1], "width"), b.op("Sub", [y2, y1], "height")
    if not half_pixel:  # output_half_pixel (RoiAlign-10's behaviour): boxes at least one pixel
        width, height = (b.op("Max", [v, b.const("one", 1.0)]) for v in (width, height))
    rows = _axis_weights(b, y1, height, height_f, b.op("Squeeze", [height_i]), out_h, ratio)
    cols = _axis_weights(b, x1, width, width_f, b.op("Squeeze", [width_i]), out_w, ratio)
    # rows over the stacked B*H rows of every image: zero outside the box's own image
    images = b.op("Range", [b.const("zero_i", 0, np.int64), b.op("Squeeze", [batch_i]), b.const("one_i", 1, np.int64)])
    own = b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [batch_index, b.const("axis", [1], np.int64)]), images])],
               "own_image", to=TensorProto.FLOAT)  # [R, B]
    stacked = b.op("Mul", [b.op("Unsqueeze", [own, b.const("axes", [1, 3], np.int64)]),
                           b.op("Unsqueeze", [rows, b.const("axis", [2], np.int64)])])  # [R, out_h, B, H]
    stacked = b.op("Reshape", [stacked, b.const("shape", [0, 0, -1], np.int64)], "stacked_rows")  # [R, out_h, B*H]
    channels_first = b.op("Transpose", [features], perm=[1, 0, 2, 3])  # [C, B, H, W]
    image_rows = b.op("Reshape", [channels_first, b.op("Concat", [
        b.op("Slice", [shape, b.const("s", [1], np.int64), b.const("e", [2], np.int64)]), b.const("minus_one", [-1], np.int64),
        width_i], axis=0)], "image_rows")  # [C, B*H, W]
    sampled_rows = b.op("MatMul", [b.op("Unsqueeze", [stacked, b.const("axis", [1], np.int64)]), image_rows])  # [R, C, out_h, W]
    cols_t = b.op("Transpose", [b.op("Unsqueeze", [cols, b.const("axis", [1], np.int64)])], perm=[0, 1, 3, 2])  # [R, 1, W, out_w]
    b.op("MatMul", [sampled_rows, cols_t], "output", outputs=[node.output[0]])
    return b


def decompose_roi_align(model: onnx.ModelProto) -> int:
    """Replace every rewritable RoiAlign of ``model`` in place; returns how many were replaced."""
    graph, replaced = model.graph, 0
    nodes = []
    for index, node in enumerate(graph.node):
        if not rewritable(node):
            nodes.append(node)
            continue
        built = _replacement(node, node.name or f"RoiAlign_{index}")
        nodes.extend(built.nodes)
        graph.initializer.extend(built.constants)
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return replaced
