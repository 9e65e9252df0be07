"""engines/roi_align.py: RoiAlign as plain operators equals ONNX Runtime's RoiAlign, so TensorRT
builds radm_head without its ROIAlign_TRT plugin."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from posterrt.engines.cleanup import CLEAN_RTOL, FP16_RTOL, compare_onnx, prepare_onnx
from posterrt.engines.onnx_operators import check_model, check_file
from posterrt.engines.roi_align import decompose_roi_align, rewritable


def _roi_align_model(**attributes):
    node = helper.make_node("RoiAlign", ["x", "rois", "index"], ["y"], name="roi", **attributes)
    height, width = attributes.get("output_height", 1), attributes.get("output_width", 1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"]),
                                            helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["r", 4]),
                                            helper.make_tensor_value_info("index", TensorProto.INT64, ["r"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 3, height, width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", ["half_pixel", "output_half_pixel"])
def test_the_rewrite_equals_onnx_runtimes_roi_align(mode):
    attributes = dict(mode="avg", output_height=7, output_width=5, sampling_ratio=2, spatial_scale=0.25,
                      coordinate_transformation_mode=mode)
    reference, rewritten = _roi_align_model(**attributes), _roi_align_model(**attributes)
    assert decompose_roi_align(rewritten) == 1
    assert "RoiAlign" not in {n.op_type for n in rewritten.graph.node}
    assert check_model(rewritten)["verdict"] == "clean" and not check_model(rewritten)["findings"]
    rng = np.random.default_rng()
    for batch, height, width in ((1, 16, 24), (3, 9, 13), (2, 128, 96)):  # the last: coordinates up to 128 px
        x = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
        corner = rng.uniform(-20, 4 * max(height, width) + 20, (12, 2))  # some boxes leave the map
        rois = np.concatenate([corner, corner + rng.uniform(0, 40, (12, 2))], 1).astype(np.float32)
        rois[0] = [0, 0, 4 * width, 4 * height]  # the whole map
        rois[1] = [5, 5, 5, 5]  # an empty box
        feeds = {"x": x, "rois": rois, "index": rng.integers(0, batch, 12).astype(np.int64)}
        expected = _session(reference).run(None, feeds)[0]
        actual = _session(rewritten).run(None, feeds)[0]
        # ONNX Runtime's own order of float operations for the sample points: a few float32 ulps
        assert np.abs(actual - expected).max() <= 1e-6 * np.abs(expected).max()


def test_only_what_posterrt_emits_is_rewritten():
    assert not rewritable(_roi_align_model(mode="max", sampling_ratio=2).graph.node[0])
    assert not rewritable(_roi_align_model(mode="avg", sampling_ratio=0).graph.node[0])  # adaptive: per-box loop
    adaptive = _roi_align_model(mode="avg", sampling_ratio=0)
    assert decompose_roi_align(adaptive) == 0 and check_model(adaptive)["plugins"] == ["ROIAlign_TRT"]


@pytest.mark.parametrize("precision, rtol", [("fp32", CLEAN_RTOL), ("fp16", FP16_RTOL)])
def test_radm_head_prepared_for_tensorrt_keeps_parity_without_roi_align(tiny_bundle, tmp_path, precision, rtol):
    from posterrt.runtime.bundle import Bundle

    bundle = Bundle(tiny_bundle)
    target = tmp_path / "radm_head.onnx"
    report = prepare_onnx(bundle.model_path("radm_head"), target, model_name="radm_head", precision=precision)
    assert report["roi_aligns_rewritten"] > 0
    operators = check_file(target)
    assert operators["verdict"] == "clean" and "RoiAlign" not in operators["operators"]
    parity = compare_onnx(bundle.model_path("radm_head"), target, bundle.contract("radm_head"), rtol=rtol)
    assert parity["passed"], parity
