"""ONNX Runtime CPU variants on the tiny preset: written into the bundle only after the gates,
fp32-opt keeps export parity, int8 keeps its fp32 islands, a variant that fails the pipeline gate is
refused with the failed check, and the runtime can select what was written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from posterrt.engines import ort_optimize
from posterrt.engines.quality_gate import EXACT
from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.errors import BundleError, InputError, ParityError
from posterrt.runtime.samples import default_sizes, sample_inputs

MODEL = "bg_unet"


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle, tmp_path_factory):
    """A private copy: optimizing writes variants and a new manifest into the bundle folder."""
    folder = tmp_path_factory.mktemp("optimize") / "tiny"
    shutil.copytree(tiny_bundle, folder)
    return folder


@pytest.fixture(scope="module")
def fp32_opt(bundle_dir):
    return ort_optimize.optimize_bundle(bundle_dir, "fp32-opt", [MODEL], progress=lambda _: None)[MODEL]


@pytest.fixture(scope="module")
def int8_dynamic(bundle_dir):
    return ort_optimize.optimize_bundle(bundle_dir, "int8-dynamic", [MODEL], progress=lambda _: None)[MODEL]


@pytest.fixture(scope="module")
def int8_graph(bundle_dir, tmp_path_factory):
    """The static int8 graph as the builder writes it, before any gate (see the refusal test)."""
    target = tmp_path_factory.mktemp("int8") / f"{MODEL}.int8.onnx"
    report = ort_optimize.build_variant(Bundle(bundle_dir), MODEL, "int8", target)
    return target, report


def _weight_bytes(graph) -> int:
    return sum(len(tensor.raw_data) for tensor in graph.initializer)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fp32_opt_is_written_registered_and_fused(bundle_dir, fp32_opt):
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    entry = manifest["variants"][MODEL]["fp32-opt"]
    assert entry["file"] == f"{MODEL}.fp32-opt.onnx" and (bundle_dir / entry["file"]).is_file()
    assert entry["source_sha256"] == manifest["models"][MODEL]["sha256"]
    assert entry["gate"]["passed"] and entry["gate"]["tolerances"]["noise_max_rel"] == EXACT.noise_max_rel
    # the self-attention layers became ORT's fused Attention kernel
    assert fp32_opt["build"]["fusions"].get("Attention", 0) > 0
    ops = {node.op_type for node in onnx.load(str(bundle_dir / entry["file"])).graph.node}
    assert "Attention" in ops


def test_fp32_opt_passes_the_pipeline_gate(fp32_opt):
    """Beyond the model-level gate, whole pipelines calling bg_unet (background, poster) ran with
    fp32-opt against the fp32 bundle and met the fp32 accuracy thresholds (enforced)."""
    report = fp32_opt["pipeline_gate"]
    assert report["gate"]["passed"], report["gate"]["failures"]
    assert set(report["pipelines"]) == {"background", "poster"}
    assert report["gate"]["thresholds"]["psnr_db"] == 40.0


def test_int8_dynamic_passes_the_enforced_pipeline_gate(int8_dynamic):
    """Approximate variants meet the reduced-precision thresholds on the background pipeline (the
    one that ends at bg_unet's picture); the poster pipeline, which re-runs RADM on that picture,
    is recorded beside it (ort_optimize.DOWNSTREAM_RECORDED says why)."""
    gate = int8_dynamic["pipeline_gate"]["gate"]
    assert gate["passed"] and gate["enforced_pipelines"] == ["background"] and gate["recorded_pipelines"] == ["poster"]
    assert gate["thresholds"]["psnr_db"] == 30.0


def test_static_int8_of_the_tiny_unet_is_refused_with_the_failed_check(bundle_dir):
    """The tiny random-weight bg_unet in static int8 passes the model-level gate but one background
    request of the pipeline gate lands under 30 dB: the variant is refused and nothing is written."""
    before = (bundle_dir / MANIFEST).read_text()
    with pytest.raises(ParityError, match=r"bg_unet int8: accuracy gate failed: background: PSNR [\d.]+ dB < 30 dB"):
        ort_optimize.optimize_bundle(bundle_dir, "int8", [MODEL], progress=lambda _: None)
    assert (bundle_dir / MANIFEST).read_text() == before
    assert not (bundle_dir / f"{MODEL}.int8.onnx").exists()
    assert not [p for p in bundle_dir.iterdir() if "staging" in p.name]


def test_fp32_opt_keeps_parity_on_fresh_inputs(bundle_dir, fp32_opt):
    """1e-4 of the output's scale, like the export's own parity check, at two sizes of every axis."""
    bundle = Bundle(bundle_dir)
    contract = bundle.contract(MODEL)
    original = _session(bundle.model_path(MODEL))
    optimized = _session(bundle.model_path(MODEL, variant="fp32-opt"))
    seed = int.from_bytes(os.urandom(4), "little")
    for index, kind in enumerate(("small", "other")):
        inputs = sample_inputs(contract, default_sizes(kind), seed + index)
        expected = original.run(None, inputs)[0]
        actual = optimized.run(None, inputs)[0]
        relative = np.abs(actual - expected).max() / np.abs(expected).max()
        assert relative <= 1e-4, f"seed {seed}, {kind}: {relative:.2e}"


def test_int8_is_quantized_with_fp32_islands(bundle_dir, int8_graph):
    path, report = int8_graph
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 10
    producers = {out: node.op_type for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    matmuls = {node.name: node for node in graph.node if node.op_type == "MatMul"}
    original = onnx.load(str(Bundle(bundle_dir).model_path(MODEL)))
    kept = ort_optimize.fp32_nodes(original)
    scores = ort_optimize.attention_score_matmuls(original)
    assert kept["attention_probabilities"] and kept["io_conv"]
    # every attention has one score MatMul and one probabilities x values MatMul
    assert len(scores) == len(kept["attention_probabilities"])
    # probabilities x values (fed by the Softmax): fp32, no dequantized input
    for name in kept["attention_probabilities"]:
        assert "Softmax" in [producers.get(i) for i in matmuls[name].input]
        assert "DequantizeLinear" not in [producers.get(i) for i in matmuls[name].input], name
    # scores Q x K^T: both inputs quantized, the logits they write stay fp32 (no QuantizeLinear)
    for name in scores:
        assert [producers.get(i) for i in matmuls[name].input] == ["DequantizeLinear"] * 2, name
        assert "QuantizeLinear" not in consumers[matmuls[name].output[0]], name
    assert report["fp32_nodes"]["attention_probabilities"] == len(kept["attention_probabilities"])
    assert report["attention_scores"] == {"quantized_inputs": len(scores), "fp32_outputs": len(scores)}
    # the weights are stored in int8 (the file size would also count the graph's nodes, a large
    # share of the tiny model, which the attention scores' QuantizeLinear nodes add to)
    assert _weight_bytes(graph) < 0.5 * _weight_bytes(original.graph)


def test_split_concat_convs_is_exact_on_fresh_inputs(bundle_dir, tmp_path):
    """A conv over concatenated channels == the sum of convs over the parts (fp32 rounding only)."""
    source = Bundle(bundle_dir).model_path(MODEL)
    model = onnx.load(str(source))
    kept = ort_optimize.fp32_nodes(model)
    candidates = set(kept["concat_input"]) - set(kept["io_conv"])
    split = ort_optimize.split_concat_convs(model, candidates, source.parent)
    assert split and set(split) <= candidates
    names = {node.name for node in model.graph.node}
    assert not set(split) & names and all(f"{name}/part0" in names and f"{name}/part1" in names for name in split)
    onnx.save(model, str(tmp_path / "split.onnx"))
    seed = int.from_bytes(os.urandom(4), "little")
    inputs = sample_inputs(Bundle(bundle_dir).contract(MODEL), default_sizes("other"), seed)
    expected = _session(source).run(None, inputs)[0]
    actual = _session(tmp_path / "split.onnx").run(None, inputs)[0]
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max(), f"seed {seed}"


def test_int8_quantizes_the_split_concat_convs(int8_graph):
    path, report = int8_graph
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    parts = [node for node in graph.node if node.op_type == "Conv" and "/part" in node.name]
    assert report["split_concat_convs"] > 0 and len(parts) >= 2 * report["split_concat_convs"]
    for node in parts:  # each part reads its own quantized activation and int8 weights
        assert producers.get(node.input[0]) == "DequantizeLinear" and producers.get(node.input[1]) == "DequantizeLinear"


def test_int8_attention_scores_run_on_integer_kernels(int8_graph, tmp_path):
    """ONNX Runtime turns each quantized score MatMul (DQ inputs, fp32 output) into its integer GEMM
    with an fp32 result, not into a dequantize-then-fp32 MatMul."""
    import onnxruntime as ort

    path, report = int8_graph
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("MatMulIntegerToFloat") >= report["attention_scores"]["fp32_outputs"] > 0


def test_backend_runs_the_selected_variant(bundle_dir, int8_dynamic):
    from posterrt.runtime.backends.onnxruntime import OrtBackend

    bundle = Bundle(bundle_dir)
    inputs = sample_inputs(bundle.contract(MODEL), default_sizes("small"), seed=3)
    with OrtBackend(bundle, variants={MODEL: "int8-dynamic"}) as backend:
        got = backend.run(MODEL, inputs)["noise_pred"]
    direct = _session(bundle_dir / int8_dynamic["file"]).run(None, inputs)[0]
    fp32 = _session(bundle.model_path(MODEL)).run(None, inputs)[0]
    np.testing.assert_array_equal(got, direct)
    assert not np.array_equal(got, fp32)


def test_unknown_and_stale_variants_are_refused(bundle_dir, int8_dynamic, tmp_path):
    with pytest.raises(BundleError, match="has no variant 'bf16'"):
        Bundle(bundle_dir).model_path(MODEL, variant="bf16")
    with pytest.raises(InputError, match="--variant"):
        ort_optimize.check_variant("fp8")
    # a re-exported model (another hash) makes its old variants stale
    stale = tmp_path / "stale"
    shutil.copytree(bundle_dir, stale)
    manifest = json.loads((stale / MANIFEST).read_text())
    manifest["models"][MODEL]["sha256"] = "0" * 64
    (stale / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="made from another export"):
        Bundle(stale).model_path(MODEL, verify=False, variant="int8-dynamic")
    # a shallow step's graph keeps its hash when only the weights it reads (the deep step's file) change
    shallow = manifest["models"]["bg_unet_shallow"]
    assert Bundle(stale).model_path("bg_unet_shallow", verify=False, variant="int8-dynamic")
    shallow["data_sha256"] = {name: "0" * 64 for name in shallow["data_sha256"]}
    (stale / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="variant 'int8-dynamic' of bg_unet_shallow was made from another export"):
        Bundle(stale).model_path("bg_unet_shallow", verify=False, variant="int8-dynamic")


def test_cli_optimize_writes_dynamic_int8_and_report(bundle_dir, tmp_path):
    report = tmp_path / "reports"
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "engines", "optimize", "--bundle", str(bundle_dir),
                             "--variant", "int8-dynamic", "--models", MODEL, "--out", str(report)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{MODEL}.int8-dynamic.onnx" in result.stdout and "PSNR" in result.stdout
    written = json.loads((report / "optimize-int8-dynamic.json").read_text())
    assert written[MODEL]["gate"]["passed"]
    assert "int8-dynamic" in Bundle(bundle_dir).variants(MODEL)
    bad = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "engines", "optimize", "--bundle", str(bundle_dir),
                          "--variant", "fp8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_render_unet_int8_is_judged_on_the_render_pipeline(bundle_dir):
    """The same recipe on the ControlNet + UNet step graph (its fp32 islands found by the same rules)
    passes the model-level gate, then the render pipeline judges the picture: on the tiny
    random-weight bundle it falls short and is refused, naming the render check."""
    with pytest.raises(ParityError, match=r"render_unet int8: accuracy gate failed: render: PSNR"):
        ort_optimize.optimize_bundle(bundle_dir, "int8", ["render_unet"], progress=lambda _: None)
    assert "int8" not in Bundle(bundle_dir).variants("render_unet")


# ---------------------------------------------------------------------------------------------
# A UNet's variant covers its feature-cache steps (bg_unet_deep, bg_unet_shallow)
# ---------------------------------------------------------------------------------------------
DEEP, SHALLOW = "bg_unet_deep", "bg_unet_shallow"


def test_a_unet_variant_builds_gates_and_registers_its_cached_steps(bundle_dir, int8_dynamic, tmp_path):
    """`--models bg_unet` also wrote the pair: each step gated on its own (the shallow one fed the fp32
    deep feature), the cached loop at interval 3 against the fp32 cached loop, and the cached
    background pipeline; each variant carries its own weights (not the export's shared data file)."""
    from posterrt.engines.quality_gate import GATE_CACHE_INTERVAL, gate_cache_interval

    bundle = Bundle(bundle_dir)
    assert gate_cache_interval(bundle, MODEL) == GATE_CACHE_INTERVAL  # the tiny bundle records no default
    recorded = tmp_path / "recorded"  # one that does (`engines cache-interval`): the pair is judged at it
    recorded.mkdir()
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["config"]["stable_diffusion"]["cache_interval"] = 4
    (recorded / MANIFEST).write_text(json.dumps(manifest))
    assert gate_cache_interval(Bundle(recorded), MODEL) == 4
    for model in (DEEP, SHALLOW):
        entry = bundle.variants(model)["int8-dynamic"]
        assert entry["file"] == f"{model}.int8-dynamic.onnx" and entry["source_sha256"] == bundle.models[model].sha256
        assert entry["gate"]["passed"] and entry["gate"]["figures"]["image_psnr_db"] >= 30.0
        loop = entry["cached_loop_gate"]
        assert loop["passed"] and loop["figures"]["cache_interval"] == GATE_CACHE_INTERVAL
        assert loop["figures"]["image_psnr_db"] >= 30.0 and loop["figures"]["image_psnr_db"] != float("inf")
        pipeline = entry["pipeline_gate"]
        assert pipeline["gate"]["passed"] and "background" in pipeline["gate"]["enforced_pipelines"]
        assert pipeline["settings"]["candidate_request"] == pipeline["settings"]["reference_request"] == \
            {"cache_interval": GATE_CACHE_INTERVAL}
        graph = onnx.load(str(bundle.model_path(model, variant="int8-dynamic")), load_external_data=False)
        assert not [t for t in graph.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
        assert "MatMulInteger" in {node.op_type for node in graph.graph.node}
    assert "deep_feature" in [i.name for i in onnx.load(str(bundle_dir / f"{SHALLOW}.int8-dynamic.onnx")).graph.input]


def test_shallow_step_calibrates_on_the_fp32_deep_feature_of_its_inputs(bundle_dir, tmp_path):
    from posterrt.engines import quality_gate

    bundle = Bundle(bundle_dir)
    shallow = quality_gate.cached_step_calibration(bundle, SHALLOW, requests=1, steps=3)
    deep = quality_gate.cached_step_calibration(bundle, DEEP, requests=1, steps=3)
    assert len(shallow) == len(deep) == 3 and all("deep_feature" not in inputs for inputs in deep)
    contract = bundle.contract(SHALLOW)
    fp32_deep = _session(bundle.model_path(DEEP))
    for inputs, deep_inputs in zip(shallow, deep):
        assert set(inputs) == set(contract.input_names)
        batch, _, height, width = inputs["sample"].shape
        assert inputs["deep_feature"].shape == (batch, bundle.models[SHALLOW].static_dims["deep_channels"], height, width)
        np.testing.assert_array_equal(inputs["sample"], deep_inputs["sample"])
        feature = fp32_deep.run(["deep_feature"], deep_inputs)[0]
        np.testing.assert_array_equal(inputs["deep_feature"], feature)  # the same inputs' fp32 deep feature
    # static int8 of the shallow step calibrates on them (the quantizer runs the graph on every input)
    report = ort_optimize.build_variant(bundle, SHALLOW, "int8", tmp_path / f"{SHALLOW}.int8.onnx", {"steps": 2})
    assert report["calibration_inputs"] == 2 * 2  # two requests of two steps


def _background(backend, interval):
    from posterrt.runtime.pipelines import build_pipeline
    from posterrt.runtime.pipelines.request import PosterRequest

    product = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    request = PosterRequest(product=product, product_mask=mask, size=(256, 256), steps=4, cache_interval=interval)
    return build_pipeline("background", backend, progress=False)(request).image


def _opened_files(monkeypatch) -> list[str]:
    """Names of the files ONNX Runtime sessions are opened on, from now on in this test."""
    import onnxruntime as ort

    opened, real = [], ort.InferenceSession

    def recording(path, *args, **kwargs):
        opened.append(os.path.basename(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return opened


def test_a_cached_request_runs_the_unet_variant_on_both_cached_steps(bundle_dir, int8_dynamic, monkeypatch):
    from posterrt.runtime.backends.onnxruntime import OrtBackend

    bundle = Bundle(bundle_dir)
    with OrtBackend(bundle, intra_op_threads=2) as fp32:
        reference = _background(fp32, 2)
    opened = _opened_files(monkeypatch)
    with OrtBackend(bundle, intra_op_threads=2, variants={MODEL: "int8-dynamic"}) as backend:
        image = _background(backend, 2)
    unet_files = [name for name in opened if name.startswith(MODEL)]
    assert unet_files == [f"{DEEP}.int8-dynamic.onnx", f"{SHALLOW}.int8-dynamic.onnx"]
    assert not np.array_equal(image, reference)  # the variant's numbers, not the export's
    opened.clear()
    with OrtBackend(bundle, intra_op_threads=2, variants={MODEL: "int8-dynamic"}) as backend:
        _background(backend, 1)
    assert [name for name in opened if name.startswith(MODEL)] == [f"{MODEL}.int8-dynamic.onnx"]


def test_missing_cached_step_variants_are_named_with_the_command_that_builds_them(bundle_dir, int8_dynamic, tmp_path):
    """A bundle whose bg_unet has the variant and whose cached steps lack it (built before this rule):
    uncached requests run; a cached one fails in one line naming the command, which then builds the
    pair alone; naming a cached step in the choice is refused (one choice covers the UNet's graphs)."""
    from posterrt.runtime.backends.onnxruntime import OrtBackend

    partial = tmp_path / "partial"
    shutil.copytree(bundle_dir, partial)
    manifest = json.loads((partial / MANIFEST).read_text())
    for model in (DEEP, SHALLOW):
        manifest["variants"][model].pop("int8-dynamic")
    (partial / MANIFEST).write_text(json.dumps(manifest))
    variants = {MODEL: "int8-dynamic"}
    with OrtBackend(Bundle(partial), intra_op_threads=2, variants=variants) as backend:
        _background(backend, 1)
        with pytest.raises(BundleError) as raised:
            _background(backend, 2)
    message = str(raised.value)
    assert "\n" not in message and f"no 'int8-dynamic' of {DEEP}" in message
    command = message.split("`")[1]
    assert command == f"posterrt engines optimize --bundle {partial} --variant int8-dynamic --models {DEEP},{SHALLOW}"
    with pytest.raises(InputError, match=f"variants: {DEEP} is a feature-cache step of {MODEL}"):
        OrtBackend(Bundle(partial), variants={DEEP: "int8-dynamic"})

    before = Bundle(partial).variants(MODEL)["int8-dynamic"]
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", *command.split()[1:]],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{DEEP}.int8-dynamic.onnx" in result.stdout and "cached loop (interval 3) PSNR" in result.stdout
    rebuilt = Bundle(partial)
    assert rebuilt.variants(MODEL)["int8-dynamic"] == before  # the plain step's variant was not rebuilt
    assert {DEEP, SHALLOW} == {m for m in (DEEP, SHALLOW) if "int8-dynamic" in rebuilt.variants(m)}
    with OrtBackend(rebuilt, intra_op_threads=2, variants=variants) as backend:
        _background(backend, 2)
