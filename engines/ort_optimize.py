"""Optimized ONNX Runtime variants of a bundle's models, for CPU serving.

A variant is written beside the model as ``<model>.<variant>.onnx`` with an entry in the bundle
manifest (``manifest["variants"][model][variant]``: file, sha256, the sha256 of the fp32 model it
was made from, the build settings and the quality-gate report). ``Bundle.model_path(model,
variant=...)`` and ``OrtBackend(variants=...)`` select it. A variant that fails the gate is never
written: :func:`optimize_bundle` raises ParityError naming the failed checks. A UNet's variant also
covers its feature-cache graphs (``<unet>_deep``, ``<unet>_shallow``): built, gated as a pair and
registered beside it (:func:`build_order`), so a request that caches runs the same variant.

Variants:

* ``fp32-opt``: same numbers as the export (gated at 1e-4). ONNX Runtime's transformer fusions for
  UNets (``onnxruntime.transformers.optimizer``, model type ``unet``) restricted to the fusions
  with CPU kernels (self-attention into ``Attention``, LayerNorm, SkipLayerNorm, Gelu); the GPU-only
  ones (GroupNorm, NHWC Conv, BiasSplitGelu, packed QKV) are off. Then ONNX Runtime's own
  *extended* graph optimizations, applied once and saved, so loading does not redo them. The
  *all* level (NCHWc layouts) is left to load time: ORT warns that a graph saved at that level
  only fits the CPU it was made on.
* ``int8``: static QDQ quantization (``onnxruntime.quantization.quantize_static``): weights int8
  per output channel, activations uint8 per tensor (U8S8, the pair MLAS' VNNI kernels run),
  calibrated on the step inputs the fp32 model sees along its own guided denoising loops (see
  :func:`quality_gate.calibration_inputs`). Mixed precision: what stays fp32 is listed by
  :func:`fp32_nodes` (and why).
* ``int8-dynamic``: dynamic quantization of the weight MatMuls only (activation scales computed
  per call); no calibration, convolutions stay fp32.

* ``openvino-fp32``: the model converted to OpenVINO IR (``<model>.openvino-fp32.xml`` + ``.bin``,
  fp32 weights), run by OpenVINO at f32 (gated at 1e-4, like fp32-opt). Faster than ONNX Runtime's
  fp32 on the paper UNets (benchmarks/RESULTS.md).
* ``openvino-bf16``: the same IR marked to run at bf16 (OpenVINO's CPU plugin computes Conv /
  MatMul in bf16 on AVX-512-bf16 cores, keeping what it judges sensitive in fp32), gated as
  reduced precision.
* ``openvino-int8``: the IR quantized by NNCF's post-training quantization (int8 weights stored
  int8, activations through FakeQuantize, calibrated on the same loops as ``int8``); what NNCF
  leaves unquantized runs at f32 (see :func:`build_openvino_int8`). Gated as reduced precision.
* ``openvino-int8-bf16``: the same quantization, its float remainder run at bf16 (for AVX-512-bf16
  / AMX cores); which of the two is faster is the step benchmark's question.

bf16 is not an ONNX Runtime variant: its CPU provider has no bf16 Conv or MatMul kernels (opset 17
does not even list bf16 for Conv), so a bf16 ONNX graph does not load; the bf16 path is OpenVINO.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from posterrt.runtime.bundle import MANIFEST, Bundle, sha256_file
from posterrt.runtime.errors import BackendError, InputError
from posterrt.runtime.families import cached_step_of, cached_steps, unet_families

from . import quality_gate
from .quality_gate import APPROXIMATE, EXACT, Tolerances

VARIANTS = ("fp32-opt", "int8", "int8-dynamic", "openvino-fp32", "openvino-bf16", "openvino-int8",
            "openvino-int8-bf16")
#: Which gate each variant must pass.
VARIANT_GATES: dict[str, Tolerances] = {"fp32-opt": EXACT, "int8": APPROXIMATE, "int8-dynamic": APPROXIMATE,
                                        "openvino-fp32": EXACT, "openvino-bf16": APPROXIMATE,
                                        "openvino-int8": APPROXIMATE, "openvino-int8-bf16": APPROXIMATE}
#: OpenVINO IR variants: the precision OpenVINO runs each at (for the int8 ones, the precision of
#: the operations NNCF left unquantized: see build_openvino_int8).
OPENVINO_PRECISION = {"openvino-fp32": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32",
                      "openvino-int8-bf16": "bf16"}
#: The OpenVINO variants NNCF quantizes.
OPENVINO_INT8 = ("openvino-int8", "openvino-int8-bf16")
#: Models past this size are written with their weights in ``<file>.data`` (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = (2 << 30) - (64 << 20)


def check_variant(value: str) -> str:
    if value not in VARIANTS:
        raise InputError(f"--variant: unknown variant {value!r}; expected one of {', '.join(VARIANTS)}")
    return value


def variant_file(model: str, variant: str) -> str:
    suffix = ".xml" if variant in OPENVINO_PRECISION else ".onnx"
    return f"{model}.{check_variant(variant)}{suffix}"


# ---------------------------------------------------------------------------------------------
# fp32-opt
# ---------------------------------------------------------------------------------------------
def cpu_fusion_options():
    """The ``unet`` fusion set with the fusions whose ops only have GPU kernels switched off."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    for gpu_only in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        setattr(options, gpu_only, False)
    return options


def build_fp32_opt(source: Path, target: Path) -> dict:
    """Transformer fusions, then ORT's extended optimizations saved into ``target``."""
    from onnxruntime.transformers import optimizer

    import onnxruntime as ort

    big = _is_big(source)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fuse-") as scratch:
        fused_path = Path(scratch) / "fused.onnx"
        _quiet_onnxruntime_tools()
        fused = optimizer.optimize_model(str(source), model_type="unet", opt_level=0, use_gpu=False,
                                         optimization_options=cpu_fusion_options())
        fusions = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        fused.save_model_to_file(str(fused_path), use_external_data_format=big)
        del fused
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        if big:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             target.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        ort.InferenceSession(str(fused_path), options, providers=["CPUExecutionProvider"])
    return {"fusions": fusions, "ort_level": "extended"}


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
def activation_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls of two activations (no weight input): in these UNets, the attention layers' scores
    (Q x K^T) and their probabilities x values."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    weights = initializers | constants
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and not any(i in weights for i in node.input)]


def attention_score_matmuls(model: onnx.ModelProto) -> list[str]:
    """The activation x activation MatMuls that static int8 quantizes: those no Softmax feeds (the
    attention scores Q x K^T; both inputs are projections with ordinary, roughly symmetric ranges)."""
    kept = set(fp32_nodes(model)["attention_probabilities"])
    return [node.name for node in activation_matmuls(model) if node.name not in kept]


def fp32_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes static int8 keeps in fp32, by reason:

    * ``attention_probabilities``: the attention MatMuls fed by a Softmax (probabilities x values):
      the probabilities span 0..1 with most mass near 0, which one uint8 scale per tensor rounds
      away. The other activation x activation MatMuls, the scores Q x K^T, are quantized: both
      inputs are projections with ordinary ranges, and the category attention's masked logits
      (-1e4) are added to their output, after the MatMul, whose output stays fp32
      (:func:`build_int8_static` removes the Q/DQ the quantizer puts there);
    * ``io_conv``: the first and the last convolution: the first sees the raw latent, the masked
      image latent and the binary mask in one tensor, the last writes the noise prediction itself
      (the output's error scale); together under 1% of the FLOPs;
    * ``gemm``: the timestep-embedding MLP (Gemm): a few thousand MACs, and its error modulates
      every ResNet block;
    * ``concat_input``: layers fed straight by a Concat: in the UNet's up blocks the 1x1
      ``conv_shortcut`` reads the decoder features concatenated with the encoder's skip features,
      whose ranges differ by an order of magnitude, so one uint8 scale for both loses the smaller
      half (measured on the tiny preset: relative noise error 0.106 -> 0.067 from this alone).
      Static int8 then splits those convolutions by part (:func:`split_concat_convs`) and quantizes
      the parts; what stays fp32 of this group are the MatMuls fed by a Concat.
    """
    softmax_outputs = {out for node in model.graph.node if node.op_type == "Softmax" for out in node.output}
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    concatenated = {out for node in model.graph.node if node.op_type == "Concat" for out in node.output}
    return {
        "attention_probabilities": [node.name for node in activation_matmuls(model)
                                    if any(i in softmax_outputs for i in node.input)],
        "io_conv": [convs[0], convs[-1]] if len(convs) >= 2 else convs,
        "gemm": [node.name for node in model.graph.node if node.op_type == "Gemm"],
        "concat_input": [node.name for node in model.graph.node
                         if node.op_type in ("Conv", "MatMul") and node.input and node.input[0] in concatenated],
    }


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over a list of input dicts."""

    def __init__(self, inputs: list[dict]):
        self._inputs = inputs
        self._iterator = iter(inputs)

    def get_next(self):
        return next(self._iterator, None)

    def rewind(self):
        self._iterator = iter(self._inputs)


def build_int8_static(source: Path, target: Path, calibration: list[dict]) -> dict:
    """Static QDQ int8 of ``source``, calibrated on ``calibration`` (step inputs).

    No ``quant_pre_process``: the export already folded constants, and its copies of a 3.4 GB UNet
    (load, ORT session, shape inference) do not fit beside the calibration session in 24 GB.
    MinMax with a moving average over the calibration calls: the mean of each call's extremes
    rather than the single most extreme value, so one outlying step does not stretch a scale.

    The attention score MatMuls get Q/DQ on both inputs only: their output (the logits, before the
    category mask is added and the Softmax reads them) stays fp32, so ONNX Runtime runs them as
    ``MatMulIntegerToFloat`` (int8 GEMM, fp32 result) instead of re-quantizing the logits.
    Measured on the paper bg_unet step (ORT profile, 2 threads): the activation x activation MatMuls
    111 -> 95 ms, the step ~2.5% faster, gate figures unchanged. With the quantizer's output Q/DQ
    kept (``QLinearMatMul`` + DequantizeLinear) a level-0 score MatMul ([2, 8, 1024, 40] x
    [2, 8, 40, 1024]) was slower than in fp32 in a micro-benchmark."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False)
    keep = fp32_nodes(graph)
    scores = attention_score_matmuls(graph)
    # Concat-fed convolutions (not the first one) become one convolution per concatenated part, each
    # quantized with its own activation scale, instead of staying fp32 (see split_concat_convs).
    split = split_concat_convs(graph, set(keep["concat_input"]) - set(keep["io_conv"]), source.parent)
    keep["concat_input"] = [name for name in keep["concat_input"] if name not in split]
    # Beside the source, so that the weights the graph still refers to (``<model>.onnx.data`` of a
    # big model) resolve by the same relative name; removed whatever happens.
    prepared = source.with_name(f".{source.stem}.int8-prepared-{os.getpid()}.onnx")
    try:
        onnx.save(graph, str(prepared))
        del graph
        _quiet_onnxruntime_tools()
        quantize_static(str(prepared), str(target), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[name for names in keep.values() for name in names],
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_is_big(source),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "CalibMovingAverage": True})
    finally:
        prepared.unlink(missing_ok=True)
    unquantized = _fp32_outputs(target, scores)
    return {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor (MinMax, moving average)",
            "calibration_inputs": len(calibration), "fp32_nodes": {k: len(v) for k, v in keep.items()},
            "split_concat_convs": len(split),
            "attention_scores": {"quantized_inputs": len(scores), "fp32_outputs": unquantized}}


def split_concat_convs(model: onnx.ModelProto, names: set[str], weights_dir: Path) -> list[str]:
    """In place: each Conv of ``names`` that reads a Concat over channels (group 1) becomes one Conv
    per concatenated part, with that part's slice of the weights, summed by Adds into the original
    output (the bias goes to the first part). The same function in exact arithmetic: a convolution
    over concatenated channels is the sum of the convolutions over each part. Why: in the UNet's up
    blocks the 1x1 ``conv_shortcut`` reads the decoder features concatenated with the skip
    features, whose ranges differ by an order of magnitude; one uint8 scale for both loses the
    smaller half, so these convs stayed fp32 (~6% of the int8 step). Split, each part gets its own
    scale and the convs run on int8 kernels. ``weights_dir``: where external weights resolve (only
    the split convs' weights are read). Returns the names of the split Convs."""
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inferred = shape_inference.infer_shapes(model)
    channels_of = {info.name: info.type.tensor_type.shape.dim[1].dim_value
                   for info in list(inferred.graph.value_info) + list(inferred.graph.input)
                   if len(info.type.tensor_type.shape.dim) > 1}
    del inferred
    nodes, split = [], []
    for node in graph.node:
        concat = producers.get(node.input[0]) if node.op_type == "Conv" and node.name in names else None
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (concat is None or concat.op_type != "Concat" or attributes.get("group", 1) != 1
                or {a.name: helper.get_attribute_value(a) for a in concat.attribute}.get("axis") != 1
                or node.input[1] not in initializers):
            nodes.append(node)
            continue
        channels = [channels_of.get(part, 0) for part in concat.input]
        weight = numpy_helper.to_array(initializers[node.input[1]], base_dir=str(weights_dir))
        if 0 in channels or sum(channels) != weight.shape[1]:
            nodes.append(node)  # a part of unknown width: leave the conv whole (and fp32)
            continue
        bounds = np.cumsum([0, *channels])
        parts = []
        for index, (part, low, high) in enumerate(zip(concat.input, bounds[:-1], bounds[1:])):
            sliced = numpy_helper.from_array(np.ascontiguousarray(weight[:, low:high]), f"{node.input[1]}/part{index}")
            graph.initializer.append(sliced)
            inputs = [part, sliced.name] + (list(node.input[2:3]) if index == 0 else [])
            parts.append(f"{node.output[0]}/part{index}")
            nodes.append(helper.make_node("Conv", inputs, [parts[-1]], name=f"{node.name}/part{index}", **attributes))
        total = parts[0]
        for index, part in enumerate(parts[1:], 1):
            result = node.output[0] if index == len(parts) - 1 else f"{node.output[0]}/sum{index}"
            nodes.append(helper.make_node("Add", [total, part], [result], name=f"{node.name}/sum{index}"))
            total = result
        split.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return split


def _fp32_outputs(path: Path, node_names: list[str]) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pair ``quantize_static`` puts on the output of
    each node of ``node_names`` (it quantizes every quantized op's output), wiring the consumers to
    the node's fp32 output; returns how many outputs were freed. Only the graph file is rewritten:
    the weights (``<file>.data`` of a big model) are untouched."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    wanted = set(node_names)
    dropped, freed = set(), 0
    for node in graph.node:
        if node.name not in wanted:
            continue
        output = node.output[0]
        quantizers = consumers.get(output, [])
        if not quantizers or any(q.op_type != "QuantizeLinear" for q in quantizers):
            continue
        for quantizer in quantizers:
            dequantizers = consumers.get(quantizer.output[0], [])
            assert all(d.op_type == "DequantizeLinear" for d in dequantizers), f"{quantizer.name} feeds a non-DQ node"
            for dequantizer in dequantizers:
                assert dequantizer.output[0] not in graph_outputs
                for consumer in consumers.get(dequantizer.output[0], []):
                    consumer.input[:] = [output if name == dequantizer.output[0] else name for name in consumer.input]
                dropped.add(id(dequantizer))
            dropped.add(id(quantizer))
        freed += 1
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used and not onnx.external_data_helper.uses_external_data(t)]
    for tensor in unused:  # the dropped pairs' scales and zero points (small, stored in the graph file)
        graph.initializer.remove(tensor)
    onnx.save(model, str(path))
    return freed


def build_int8_dynamic(source: Path, target: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic quantization would compute a scale per call for both activations: all activation x
    # activation MatMuls (attention scores and probabilities) stay fp32, as they always did here.
    keep = [node.name for node in activation_matmuls(onnx.load(str(source), load_external_data=False))]
    _quiet_onnxruntime_tools()
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                     use_external_data_format=_is_big(source))
    return {"format": "dynamic (MatMulInteger)", "weights": "int8 per channel, MatMul only",
            "activations": "uint8, scale per call", "fp32_nodes": {"activation_matmul": len(keep)}}


# ---------------------------------------------------------------------------------------------
# openvino-int8
# ---------------------------------------------------------------------------------------------
def build_openvino_int8(source: Path, target: Path, calibration: list[dict], precision: str) -> dict:
    """NNCF post-training int8 of the OpenVINO model of ``source``, calibrated on ``calibration``;
    the float remainder runs at ``precision``.

    The settings, for a diffusion UNet on a VNNI CPU:

    * ``model_type=TRANSFORMER``: NNCF's transformer rules for the attention layers. What they
      quantize is close to the ``int8`` variant's recipe: the convolutions and weight MatMuls, the
      attention scores Q x K^T (both inputs, symmetric), while the probabilities x values MatMuls
      (fed by the Softmax) and the first convolution's input (the raw inputs concatenated) stay
      float. The last convolution is quantized (keeping it float, as ``int8`` does, changed the
      tiny bundle's figures by 0.1 dB); without this model type NNCF also quantizes the
      probabilities and the residual Adds (3x the FakeQuantize nodes; tiny bundle: 22.0 dB);
    * SmoothQuant, which that model type switches on for the weight MatMuls, is off: it is meant for
      the outlier channels of trained transformers' activations, and measured on the tiny bundle
      (gate 2, background pipeline) it cost 4 dB (25.4 against 29.3 dB; alpha 0.5: 28.0 dB);
    * ``preset=MIXED``: weights int8 symmetric per output channel, activations asymmetric per
      tensor: most UNet activations follow a SiLU / GELU (ranges far from symmetric), and the CPU
      plugin's u8 x s8 VNNI kernels take the zero point at no cost;
    * ``subset_size``: every calibration input (two guided loops, early to late timesteps);
    * fast bias correction (NNCF's default): each layer's bias corrected from that layer's own
      statistics, one small subgraph per layer; the full one propagates through the rest of the
      model for every layer, out of proportion on a 3.4 GB UNet with two cores. Measured on the
      tiny bundle it is worth 0.3 dB; OpenVINO's own Stable Diffusion notebooks turn it off for time.

    The float operations NNCF leaves (Softmax and the MatMul it feeds, normalizations) run at f32
    in ``openvino-int8``, at bf16 in ``openvino-int8-bf16`` (on the tiny bundle bf16 cost 0.1 dB:
    background 29.2 against 29.3 dB); whether bf16 there is faster on a CPU is for
    benchmarks/unet_step.py to say. Saved with the quantized weights as int8 constants (plus their
    scales) and every other constant fp32."""
    from posterrt.runtime.backends.openvino import read_onnx, save_ir

    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    no_smoothing = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    quantized = nncf.quantize(read_onnx(source), nncf.Dataset(calibration), preset=nncf.QuantizationPreset.MIXED,
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                              fast_bias_correction=True, advanced_parameters=no_smoothing)
    operations = [op.get_type_name() for op in quantized.get_ops()]
    int8_weights = sum(1 for op in quantized.get_ops()
                       if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "i8")
    report = save_ir(quantized, target, precision)
    return {**report, "nncf_version": nncf.__version__, "preset": "mixed", "model_type": "transformer",
            "smooth_quant": False, "bias_correction": "fast", "weights": "int8 symmetric per channel",
            "activations": "8-bit per tensor (FakeQuantize)", "calibration_inputs": len(calibration),
            "fake_quantize": operations.count("FakeQuantize"), "int8_weights": int8_weights}


def import_nncf():
    """``import nncf`` with its usage telemetry off: NNCF reports to Google Analytics through the
    ``openvino_telemetry`` package, and falls back to a no-op stub when that package does not
    import (made unimportable the way :func:`import_openvino` does it). nncf is a build-time
    dependency (the ``engines`` extra); serving an int8 IR needs only openvino."""
    import sys

    from posterrt.runtime.backends.openvino import import_openvino

    import_openvino()
    sys.modules.setdefault("openvino_telemetry", None)
    try:
        import nncf
    except ImportError:
        raise BackendError("--variant openvino-int8 is built by NNCF and the `nncf` package is not installed; "
                           "install it with `pip install \"posterrt[engines]\"`") from None
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


# ---------------------------------------------------------------------------------------------
# Into the bundle
# ---------------------------------------------------------------------------------------------
def build_variant(bundle: Bundle, model: str, variant: str, target: Path, gate_options: dict | None = None) -> dict:
    """Write ``target`` (and its data file, if any); returns the build report."""
    source = bundle.model_path(model)
    started = time.perf_counter()
    if variant == "fp32-opt":
        report = build_fp32_opt(source, target)
    elif variant == "int8":
        report = build_int8_static(source, target, _calibration(bundle, model, gate_options))
    elif variant in OPENVINO_INT8:
        report = build_openvino_int8(source, target, _calibration(bundle, model, gate_options),
                                     OPENVINO_PRECISION[variant])
    elif variant in OPENVINO_PRECISION:
        from posterrt.runtime.backends.openvino import write_ir

        report = write_ir(source, target, OPENVINO_PRECISION[variant])
    else:
        report = build_int8_dynamic(source, target)
    report["build_seconds"] = round(time.perf_counter() - started, 1)
    return report


def _calibration(bundle: Bundle, model: str, gate_options: dict | None) -> list[dict]:
    """Calibration inputs from the fp32 model's own loops (a cached step's: its fp32 deep step's loops,
    see :func:`quality_gate.cached_step_calibration`); the session is released on return, before the
    quantizer loads its own copies (two paper UNets at once would not fit in memory)."""
    options = {k: v for k, v in (gate_options or {}).items() if k in ("steps", "image_size")}
    if cached_step_of(model) is not None:
        inputs = quality_gate.cached_step_calibration(bundle, model, **options)
    else:
        reference = quality_gate.ort_step(bundle.model_path(model), bundle.contract(model))
        inputs = quality_gate.calibration_inputs(reference, bundle, model, **options)
        del reference
    gc.collect()
    return inputs


def build_order(bundle: Bundle, models: list[str]) -> list[tuple[str, ...]]:
    """What ``optimize_bundle`` builds for ``models``, in order, each group registered together.

    A UNet with feature-cache graphs in the bundle brings them as a pair after itself: serving the
    UNet's variant with ``cache_interval`` > 1 runs the pair's variant (Bundle.variant_for), never an
    fp32 pair beside a reduced-precision plain step. Naming a cached step (either one) builds the pair
    alone, without rebuilding the plain step's variant."""
    order: list[tuple[str, ...]] = []
    for model in models:
        unet = cached_step_of(model)
        if unet is None:
            order.append((model,))
            pair = cached_steps(model) if model in unet_families() and unet_families()[model].cached_steps else ()
            if pair and set(pair) <= set(bundle.models):
                order.append(pair)
        else:
            bundle.require([unet, *cached_steps(unet)])  # the pair is gated on the UNet's own step inputs
            order.append(cached_steps(unet))
    return list(dict.fromkeys(order))


def optimize_bundle(bundle_dir: Path, variant: str, models: list[str], gate_options: dict | None = None,
                    tolerances: Tolerances | None = None, progress=print) -> dict[str, dict]:
    """Build, gate and register ``variant`` of each model (and of a UNet's cached steps, see
    :func:`build_order`); returns the manifest entries written.

    Each model is built in a staging folder inside the bundle and moved in only after its gates
    passed, so a failed variant leaves no file behind and a model's earlier variants stay valid. A
    UNet's cached steps pass or fail together: both steps' gates, the cached loop's and the cached
    pipelines'."""
    check_variant(variant)
    bundle = Bundle(bundle_dir)
    bundle.require(models)
    tolerances = tolerances or VARIANT_GATES[variant]
    written = {}
    for group in build_order(bundle, models):
        optimize = _optimize_model if len(group) == 1 else _optimize_cached_steps
        written.update(optimize(bundle, group, variant, tolerances, gate_options or {}, progress))
    return written


def _optimize_model(bundle: Bundle, group: tuple[str], variant: str, tolerances: Tolerances, gate_options: dict,
                    progress) -> dict[str, dict]:
    (model,) = group
    with _staging(bundle, group, variant) as files:
        progress(f"{model}: building {variant}")
        build = build_variant(bundle, model, variant, files[model], gate_options)
        progress(f"{model}: quality gate ({_gate_name(tolerances)} tolerances)")
        gate = quality_gate.run_gate(bundle, model, files[model], tolerances, **gate_options)
        quality_gate.require_pass(gate, f"{model} {variant}")
        pipeline_gate = _pipeline_gate(bundle, model, variant, files, tolerances, progress)
        entries = {model: _entry(bundle, model, files[model], build, gate=gate, pipeline_gate=pipeline_gate)}
        _move_in(bundle, files, entries, variant)
    return entries


def _optimize_cached_steps(bundle: Bundle, group: tuple[str, str], variant: str, tolerances: Tolerances,
                           gate_options: dict, progress) -> dict[str, dict]:
    """A UNet's deep and shallow steps: both built, each gated (the shallow one fed the fp32 deep
    feature), then the cached loop and the cached pipelines at :func:`quality_gate.gate_cache_interval`
    against the fp32 pair; registered together or not at all."""
    unet = cached_step_of(group[0])
    interval = quality_gate.gate_cache_interval(bundle, unet)
    with _staging(bundle, group, variant) as files:
        builds = {}
        for model in group:
            progress(f"{model}: building {variant}")
            builds[model] = build_variant(bundle, model, variant, files[model], gate_options)
        progress(f"{' + '.join(group)}: quality gate ({_gate_name(tolerances)} tolerances; each step, then the "
                 f"cached loop at interval {interval})")
        gates = quality_gate.run_cached_gate(bundle, unet, files, tolerances, interval, **gate_options)
        for what, gate in gates.items():
            quality_gate.require_pass(gate, f"{what if what in group else ' + '.join(group) + ' cached loop'} {variant}")
        pipeline_gate = _pipeline_gate(bundle, unet, variant, files, tolerances, progress, cache_interval=interval)
        entries = {model: _entry(bundle, model, files[model], builds[model], gate=gates[model],
                                 cached_loop_gate=gates["cached_loop"], pipeline_gate=pipeline_gate)
                   for model in group}
        _move_in(bundle, files, entries, variant)
    return entries


def _gate_name(tolerances: Tolerances) -> str:
    return "exact" if tolerances == EXACT else "approximate"


@contextmanager
def _staging(bundle: Bundle, group: tuple[str, ...], variant: str):
    """{model: the variant's path} in a staging folder inside the bundle (one sub-folder per model, so
    each model's data files are its own), removed whatever happens."""
    staging = bundle.root / f".{group[0]}.{variant}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    files = {}
    for model in group:
        (staging / model).mkdir(parents=True)
        files[model] = staging / model / variant_file(model, variant)
    try:
        yield files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _entry(bundle: Bundle, model: str, path: Path, build: dict, **gates) -> dict:
    """The manifest entry of the variant at ``path`` (its data files: the other files of its folder)."""
    data_files = sorted(p.name for p in path.parent.iterdir() if p != path)
    return {"file": path.name, "data_files": data_files, "sha256": sha256_file(path),
            "data_sha256": {data: sha256_file(path.parent / data) for data in data_files},
            "source_sha256": bundle.models[model].sha256, "source_data_sha256": bundle.models[model].data_sha256,
            "bytes": sum(p.stat().st_size for p in path.parent.iterdir()), "build": build, **gates}


def _move_in(bundle: Bundle, files: dict[str, Path], entries: dict[str, dict], variant: str) -> None:
    """Move the gated files into the bundle, then register them (one manifest write)."""
    for path in files.values():
        for staged in path.parent.iterdir():
            os.replace(staged, bundle.root / staged.name)
    _register(bundle.root, variant, entries)


#: Pipelines that re-read a model's output with another random-weight-sensitive network, whose
#: report is recorded but not enforced for approximate variants of that model: the poster
#: pipeline runs RADM on the background bg_unet painted, and on the tiny random-weight bundle a
#: background 40 dB away from the fp32 one (invisible) already moves RADM's boxes past every layout
#: bound (measured: openvino-bf16 bg_unet, background 40.6 dB, poster layout 10% of the canvas off).
#: That measures RADM's sensitivity, not the variant's accuracy; the background pipeline, which
#: ends at the variant's picture, is the enforced check.
DOWNSTREAM_RECORDED = {"bg_unet": ("poster",)}


def _pipeline_gate(bundle: Bundle, model: str, variant: str, files: dict[str, Path], tolerances: Tolerances, progress,
                   cache_interval: int = 1) -> dict:
    """Whole pipelines (layout boxes and metrics, image PSNR/SSIM) with the variant files (``files``:
    {model: file}) against the fp32 bundle, on the fixed seeded requests of ``runtime.accuracy``, for
    every pipeline that calls ``model`` and whose models the bundle holds (otherwise recorded as
    skipped). ``cache_interval`` > 1 (a UNet's cached steps): both sides' requests cache at it.

    Enforced: exact variants (fp32-opt, openvino-fp32) must meet the fp32 thresholds on every
    pipeline; approximate ones (int8, bf16) the reduced-precision thresholds on every pipeline but
    those of :data:`DOWNSTREAM_RECORDED`, whose failures are recorded and printed. A variant that
    fails is not written (ParityError naming each failed check)."""
    from posterrt.runtime.accuracy import (ACCURACY_PIPELINES, FP32_GATE, REDUCED_PRECISION_GATE, gate_variant,
                                           pipeline_models, require_passed)

    pipelines = [p for p in ACCURACY_PIPELINES
                 if model in pipeline_models(p) and set(pipeline_models(p)) <= set(bundle.models)]
    if not pipelines:
        return {"skipped": f"the bundle lacks the other models of every pipeline that calls {model}"}
    label, cached = " + ".join(files), f", caching at interval {cache_interval}" if cache_interval > 1 else ""
    progress(f"{label}: pipeline gate ({', '.join(pipelines)}{cached})")
    exact = tolerances == EXACT
    thresholds = FP32_GATE if exact else REDUCED_PRECISION_GATE
    requests = {"candidate_request": {"cache_interval": cache_interval},
                "reference_request": {"cache_interval": cache_interval}} if cache_interval > 1 else {}
    report = gate_variant(bundle, variant, thresholds, files=files, pipelines=pipelines, **requests)
    recorded = () if exact else DOWNSTREAM_RECORDED.get(model, ())
    failures = report["gate"]["failures"]
    enforced = [f for f in failures if f.split(":", 1)[0] not in recorded]
    report["gate"].update(enforced_pipelines=[p for p in pipelines if p not in recorded],
                          recorded_pipelines=[p for p in pipelines if p in recorded],
                          passed=not enforced, failures=enforced,
                          recorded_failures=[f for f in failures if f.split(":", 1)[0] in recorded])
    for failure in report["gate"]["recorded_failures"]:
        progress(f"{label}: pipeline check (recorded, not enforced for {variant}): {failure}")
    require_passed(report, f"{label} {variant}")
    return report


def _register(bundle_dir: Path, variant: str, entries: dict[str, dict]) -> None:
    """Add the entries ({model: entry}) to the manifest, replaced atomically (a reader sees the old or
    the new one)."""
    path = bundle_dir / MANIFEST
    manifest = json.loads(path.read_text())
    for model, entry in entries.items():
        manifest.setdefault("variants", {}).setdefault(model, {})[variant] = entry
    temporary = path.with_name(MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_number))
    os.replace(temporary, path)


def _json_number(value):
    return float(value)


def _is_big(path: Path) -> bool:
    """Whether the graph and the weights it reads pass protobuf's limit. The weights are counted from
    the graph's external-data records, not from a file beside it: a UNet's shallow step reads its
    share of its deep step's ``<unet>_deep.onnx.data``."""
    graph = onnx.load(str(path), load_external_data=False)
    external = 0
    for tensor in graph.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            record = {entry.key: entry.value for entry in tensor.external_data}
            external += int(record.get("length") or (path.parent / record["location"]).stat().st_size)
    return path.stat().st_size + external > EXTERNAL_DATA_BYTES


def _quiet_onnxruntime_tools() -> None:
    # The optimizer and the quantizer log every fusion and every skipped node at INFO/WARNING.
    for name in ("onnxruntime.transformers", "onnxruntime.quantization", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
