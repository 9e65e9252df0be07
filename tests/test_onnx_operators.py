"""engines/onnx_operators.py: every exported graph against TensorRT 10.x's ONNX parser table.

The tiny bundle's report (written by the real export) is the check that runs on every export; the
small graphs below each break one rule of the table, so the check is seen to refuse, not only to
pass."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from posterrt.engines.onnx_operators import REPORT_FILE, blocking, check_model
from posterrt.engines.tensorrt_onnx_table import NOT_SUPPORTED, SUPPORTED
from posterrt.runtime.contracts import MODEL_NAMES

FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def test_every_tiny_model_is_clean(tiny_bundle):
    """Every served model, as `posterrt export` wrote them: clean. radm_head's RoiAlign, which the
    parser would import as TensorRT's ROIAlign_TRT plugin, is listed as rewritten: prepare_onnx
    (engines build, refit, gpu-onnx) replaces it with plain operators (tests/test_roi_align.py)."""
    report = json.loads((tiny_bundle / REPORT_FILE).read_text())
    models = report["models"]
    assert sorted(models) == sorted(MODEL_NAMES)
    assert {name: entry["verdict"] for name, entry in models.items()} == dict.fromkeys(MODEL_NAMES, "clean"), \
        {name: blocking(entry) for name, entry in models.items()}
    assert not [entry["plugins"] for entry in models.values() if entry["plugins"]]
    assert {name for name, entry in models.items() if entry["rewritten"]} == {"radm_head"}
    assert models["radm_head"]["rewritten"] == ["RoiAlign"] and models["radm_head"]["operators"]["RoiAlign"] > 0
    assert {f["level"] for entry in models.values() for f in entry["findings"]} <= {"rewrite"}
    assert report["summary"] == (f"TensorRT 10.15 ONNX parser table: {len(MODEL_NAMES)} of {len(MODEL_NAMES)} models "
                                 f"clean; radm_head's RoiAlign rewritten plugin-free by prepare_onnx")


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _io(name, dtype=FLOAT, shape=(1, 4, 8, 8)):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def _constant(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


CASES = {
    "unsupported op": (_model([helper.make_node("Unique", ["x"], ["y"])], [_io("x", shape=(5,))], [_io("y", shape=(None,))]),
                       "Unique", "listed as not supported"),
    "unknown op": (_model([helper.make_node("Frobnicate", ["x"], ["y"])], [_io("x")], [_io("y")]),
                   "Frobnicate", "not in the table"),
    "int32 cumsum": (_model([helper.make_node("CumSum", ["x", "axis"], ["y"])], [_io("x", INT32, (2, 5))],
                            [_io("y", INT32, (2, 5))], [_constant("axis", 1)]),
                     "CumSum", "input type INT32 (supported: FP32, FP16, BF16)"),
    "run-time cumsum axis": (_model([helper.make_node("CumSum", ["x", "axis"], ["y"])],
                                    [_io("x", shape=(2, 5)), _io("axis", INT64, ())], [_io("y", shape=(2, 5))]),
                             "CumSum", "`axis` is computed at run time"),
    "run-time reduce axes": (_model([helper.make_node("ReduceSum", ["x", "axes"], ["y"])],
                                    [_io("x"), _io("axes", INT64, (1,))], [_io("y", shape=None)]),
                             "ReduceSum", "`axes` is computed at run time"),
    "cubic resize": (_model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")], [_io("x")],
                            [_io("y", shape=(1, 4, 16, 16))], [_constant("scales", [1, 1, 2, 2], np.float32)]),
                     "Resize", "mode='cubic'"),
    "maxpool indices used": (_model([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2]),
                                     helper.make_node("Cast", ["i"], ["j"], to=FLOAT)], [_io("x")],
                                    [_io("y", shape=(1, 4, 7, 7)), _io("j", shape=(1, 4, 7, 7))]),
                             "MaxPool", "its Indices output is used"),
    "dilated pooling": (_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
                               [_io("x")], [_io("y", shape=(1, 4, 6, 6))]),
                        "MaxPool", "dilations [2, 2]"),
    "topk too large": (_model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [_io("x", shape=(1, 5000))],
                              [_io("v", shape=(1, 4000)), _io("i", INT64, (1, 4000))], [_constant("k", [4000])]),
                       "TopK", "K=4000 (must be below 3840)"),
    "custom domain": (_model([helper.make_node("Fused", ["x"], ["y"], domain="com.example")], [_io("x")], [_io("y")]),
                      "Fused", "custom operator com.example::Fused"),
    "opset 25": (_model([helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], opset=25),
                 "", "opset 25"),
    "uint16 output": (_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT16)], [_io("x")],
                             [_io("y", TensorProto.UINT16)]),
                      "", "graph output 'y' has type UINT16"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_graph_the_parser_would_refuse_is_rejected_naming_why(case):
    model, op, message = CASES[case]
    report = check_model(model, case)
    assert report["verdict"] == "rejected", report
    assert any(f["op"] == op and message in f["message"] for f in report["findings"] if f["level"] == "rejected"), report


def test_the_same_graphs_written_the_supported_way_are_clean():
    cumsum = _model([helper.make_node("CumSum", ["x", "axis"], ["y"])], [_io("x", shape=(2, 5))], [_io("y", shape=(2, 5))],
                    [_constant("axis", 1)])
    resize = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", nearest_mode="floor",
                                      coordinate_transformation_mode="asymmetric")],
                    [_io("x")], [_io("y", shape=(1, 4, 16, 16))], [_constant("scales", [1, 1, 2, 2], np.float32)])
    # axes from a Constant node, as the tracer writes them: a build-time constant
    reduce = _model([helper.make_node("Constant", [], ["axes"], value=_constant("v", [1])),
                     helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [_io("x")], [_io("y", shape=None)])
    for model in (cumsum, resize, reduce):
        report = check_model(model)
        assert report["verdict"] == "clean" and not report["findings"], report


def test_plugin_and_data_dependent_ops_are_named():
    roi = _model([helper.make_node("RoiAlign", ["x", "rois", "index"], ["y"], output_height=2, output_width=2)],
                 [_io("x"), _io("rois", shape=(3, 4)), _io("index", INT64, (3,))], [_io("y", shape=(3, 4, 2, 2))])
    report = check_model(roi)
    assert report["verdict"] == "plugin" and report["plugins"] == ["ROIAlign_TRT"]
    nonzero = check_model(_model([helper.make_node("NonZero", ["x"], ["y"])], [_io("x")], [_io("y", INT64, (4, None))]))
    assert nonzero["verdict"] == "clean"
    assert [f["level"] for f in nonzero["findings"]] == ["warning"] and "depends on the values" in nonzero["findings"][0]["message"]


def test_the_table_is_whole():
    assert not set(SUPPORTED) & NOT_SUPPORTED
    # the 10.15 edition: the 196 rows of 10.1 GA plus Attention, RMSNormalization, RotaryEmbedding, TensorScatter
    assert len(SUPPORTED) + len(NOT_SUPPORTED) == 200
    assert SUPPORTED["RoiAlign"] == ("FP32", "FP16") and "INT32" not in SUPPORTED["CumSum"]


def test_radm_text_position_ids_are_robertas_own():
    """The float CumSum that keeps radm_text_encoder parseable gives RoBERTa's position ids."""
    import torch
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    from posterrt.export.networks.radm_config import TextEncoderConfig
    from posterrt.export.networks.radm_text import RADMTextEncoder

    encoder = RADMTextEncoder(TextEncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32, max_position_embeddings=40)).eval()
    ids = torch.randint(3, 50, (4, 12))
    ids[0, 7:] = 0
    ids[1, :] = 0
    ids[2, 3] = 0
    assert torch.equal(encoder.position_ids(ids), RobertaEmbeddings.create_position_ids_from_input_ids(ids, 0))
    with torch.no_grad():
        mask = (ids != 0).long()
        assert torch.equal(encoder(ids, mask)[0], encoder.roberta(input_ids=ids, attention_mask=mask).pooler_output)


def test_build_of_radm_head_needs_no_plugin_and_a_rejected_graph_is_refused(tiny_bundle, tmp_path, monkeypatch):
    from trt_standin import standin

    from posterrt.engines.build import BuildOptions, build_engines, file_logger, load_plugins, parser_check
    from posterrt.engines.manifest import EngineError, GpuInfo

    trt = standin()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("posterrt.engines.build.current_gpu", lambda: GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    trt.unsupported_ops = ("RoiAlign",)  # as a TensorRT without its plugin library registered would
    manifest = build_engines(tiny_bundle, tmp_path, ["radm_head"], BuildOptions(refittable=()), progress=False)
    entry = manifest["engines"]["radm_head"]
    assert entry["plugins"] == [] and entry["onnx_prepare"]["roi_aligns_rewritten"] > 0 and trt.calls["plugins"] == []
    # a graph that does need a TensorRT plugin gets the plugin library registered first
    logger = file_logger(trt, tmp_path / "plugins.log")
    load_plugins(trt, logger, ["ROIAlign_TRT"])
    logger.close()
    assert trt.calls["plugins"] == [""]
    rejected = tmp_path / "unique.onnx"
    onnx.save(CASES["unsupported op"][0], str(rejected))
    with pytest.raises(EngineError, match=re.escape("unique: TensorRT's ONNX parser would reject the prepared graph: "
                                                    "Unique: listed as not supported")) as caught:
        parser_check(rejected, "unique")
    assert "serve unique with the gpu-onnx flavor" in str(caught.value)
