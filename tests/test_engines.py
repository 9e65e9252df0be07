"""posterrt.engines on CPU: profiles from the contracts, --shapes parsing, ONNX Runtime TensorRT-EP
options, engine manifests and compatibility, ONNX clean-up and precision parity in ONNX Runtime, and
the build / refit commands up to TensorRT (a recording stand-in for the `tensorrt` module)."""
from __future__ import annotations

import enum
import json
import math
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from posterrt.runtime import profiles
from posterrt.engines.cleanup import CLEAN_RTOL, FP16_RTOL, compare_onnx, prepare_onnx, relative_error
from posterrt.engines.manifest import (EngineError, GpuInfo, check_engine_compatible, engine_entry, get_entry,
                                       read_manifest, update_entry)
from posterrt.engines.precision import convert_precision, fp32_node_names
from posterrt.runtime.contracts import CONTRACTS, DYNAMIC_DIMS, MODEL_NAMES, DimRange, _parse_symbol
from posterrt.runtime.errors import ContractError, InputError
from trt_standin import StubMismatch, standin

BUNDLE_MODELS = ["plannet_denoiser", "vae_decoder", "bg_unet"]
TRT_VERSION = "10.13.0.35"  # the version of tensorrt-stubs the stand-in is held to


def resolved(name, value=3):
    """A contract with every static dim set (profiles need concrete sizes)."""
    contract = CONTRACTS[name]
    return contract.resolve({dim: value for dim in contract.static_dims})


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_profile_follows_the_contract_for_every_model(name):
    contract = resolved(name, value=5)
    profile = profiles.model_profile(contract)
    assert list(profile) == contract.input_names
    for spec in contract.inputs:
        shapes = profile[spec.name]
        assert len(shapes["min"]) == len(shapes["opt"]) == len(shapes["max"]) == len(spec.shape)
        for axis, symbol in enumerate(spec.shape):
            low, opt, high = (shapes[k][axis] for k in ("min", "opt", "max"))
            assert 1 <= low <= opt <= high, (spec.name, axis, symbol)
            base, op, factor = _parse_symbol(symbol)
            if base is None or base not in DYNAMIC_DIMS:
                assert low == opt == high == (symbol if isinstance(symbol, int) else 5)
                continue
            rng = DYNAMIC_DIMS[base]
            expected = [getattr(rng, k) // factor if op == "/" else getattr(rng, k) * factor if op == "*"
                        else getattr(rng, k) for k in ("min", "opt", "max")]
            assert [low, opt, high] == expected, (spec.name, axis, symbol)


def test_derived_latent_and_fpn_dims_are_divided():
    unet = profiles.model_profile(resolved("bg_unet"))
    assert unet["sample"]["min"][2:] == [256 // 8, 256 // 8]
    assert unet["sample"]["max"][2:] == [1024 // 8, 1024 // 8]
    assert unet["mask"]["opt"] == [2, 1, 64, 64]
    head = profiles.model_profile(resolved("radm_head"))
    assert [head[f"p{level}"]["max"][2] for level in (2, 3, 4, 5)] == [256, 128, 64, 32]


def test_cfg_batch_is_the_doubled_batch():
    # the contract's own cfg_batch range is what doubling the batch range gives
    assert profiles.cfg_range(DYNAMIC_DIMS["batch"]) == DYNAMIC_DIMS["cfg_batch"]
    ranges = profiles.parse_shapes("batch=1:2:3")
    unet = profiles.model_profile(resolved("bg_unet"), ranges)
    assert [unet["sample"][k][0] for k in ("min", "opt", "max")] == [1, 4, 6]
    assert [unet["timestep"][k][0] for k in ("min", "opt", "max")] == [1, 4, 6]
    # an explicit cfg_batch wins over the doubling
    explicit = profiles.model_profile(resolved("bg_unet"), profiles.parse_shapes("batch=1:2:3,cfg_batch=2:2:4"))
    assert [explicit["sample"][k][0] for k in ("min", "opt", "max")] == [2, 2, 4]
    # models batched by `batch` follow the override directly
    vae = profiles.model_profile(resolved("vae_decoder"), ranges)
    assert [vae["latent"][k][0] for k in ("min", "opt", "max")] == [1, 2, 3]


def test_shapes_override_narrows_the_profile():
    ranges = profiles.parse_shapes(" height=512:768:1024 , width=512 ")
    assert ranges["height"] == DimRange(512, 768, 1024, 64)
    assert ranges["width"] == DimRange(512, 512, 512, 64)
    unet = profiles.model_profile(resolved("bg_unet"), ranges)
    assert unet["sample"]["min"][2:] == [64, 64]
    assert unet["sample"]["opt"][2:] == [96, 64]
    assert unet["sample"]["max"][2:] == [128, 64]
    assert profiles.profile_ranges(resolved("bg_unet"), ranges)["width"] == {"min": 512, "opt": 512, "max": 512}
    assert profiles.parse_shapes("") == {} and profiles.parse_shapes(None) == {}


@pytest.mark.parametrize("text, message", [
    ("height", "NAME=MIN:OPT:MAX"),
    ("height=", "NAME=MIN:OPT:MAX"),
    ("height=512:768", "height=MIN:OPT:MAX"),
    ("height=a:b:c", "positive integers"),
    ("height=-64:64:128", "positive integers"),
    ("depth=1", "unknown dimension 'depth'"),
    ("height/8=64", "set 'height' instead"),
    ("height=1024:512:768", "min <= opt <= max"),
    ("height=500", "multiples of 64"),
    ("height=128", "contract range"),
    ("cfg_batch=1:2:16", "contract range"),
    ("height=512,height=768", "given twice"),
])
def test_shapes_errors_name_the_entry(text, message):
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        profiles.parse_shapes(text)
    assert str(caught.value).startswith("--shapes:") and "\n" not in str(caught.value)


def test_profile_needs_a_resolved_contract():
    with pytest.raises(ContractError, match="static dimension 'latent_channels'"):
        profiles.model_profile(CONTRACTS["bg_unet"])


def _parse_ort_shapes(text):
    shapes = {}
    for item in text.split(","):
        name, dims = item.split(":")
        assert re.fullmatch(r"\d+(x\d+)*", dims), item
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def test_ort_tensorrt_provider_options_carry_the_profile():
    contract = resolved("bg_unet")
    ranges = profiles.parse_shapes("height=512:512:768")
    options = profiles.ort_trt_provider_options(contract, overrides=ranges, engine_cache_dir="/cache/engines",
                                                timing_cache_dir="/cache/timing", opt_level=4, workspace_gb=2)
    expected = profiles.model_profile(contract, ranges)
    for key in ("min", "opt", "max"):
        parsed = _parse_ort_shapes(options[f"trt_profile_{key}_shapes"])
        assert parsed == {name: shapes[key] for name, shapes in expected.items()}
    assert _parse_ort_shapes(options["trt_profile_max_shapes"])["sample"] == [8, 3, 96, 128]
    assert options["trt_fp16_enable"] == "False"  # strongly typed: precision comes from the ONNX
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == "/cache/engines"
    assert options["trt_timing_cache_enable"] == "True" and options["trt_timing_cache_path"] == "/cache/timing"
    assert options["trt_builder_optimization_level"] == "4"
    assert options["trt_max_workspace_size"] == str(2 << 30)
    assert all(isinstance(v, str) for v in options.values())
    plain = profiles.ort_trt_provider_options(contract, weakly_typed_fp16=True)
    assert plain["trt_fp16_enable"] == "True" and "trt_engine_cache_enable" not in plain
    providers = profiles.ort_gpu_providers(contract, tensorrt=False)
    assert [p if isinstance(p, str) else p[0] for p in providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------
# Manifest and compatibility
# ---------------------------------------------------------------------------------------------
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def _entry(**changes):
    entry = engine_entry(model="bg_unet", plan="bg_unet.plan", precision="fp16",
                         profile=profiles.model_profile(resolved("bg_unet")),
                         ranges=profiles.profile_ranges(resolved("bg_unet")), gpu=H100, tensorrt_version="10.9.0.34",
                         source_onnx_sha256="ab" * 32, bundle="/bundles/tiny", build_options={"refittable": True},
                         build_seconds=12.345)
    entry.update(changes)
    return entry


def test_manifest_round_trip(tmp_path):
    assert read_manifest(tmp_path)["engines"] == {}
    update_entry(tmp_path, "bg_unet", _entry())
    update_entry(tmp_path, "vae_decoder", _entry(model="vae_decoder", plan="vae_decoder.plan"))
    manifest = read_manifest(tmp_path)
    assert sorted(manifest["engines"]) == ["bg_unet", "vae_decoder"]
    entry = get_entry(manifest, "bg_unet", tmp_path)
    assert entry["gpu"] == {"name": H100.name, "compute_capability": "9.0"}
    assert entry["profile"]["sample"]["max"] == [8, 3, 128, 128]
    assert entry["build_seconds"] == 12.3 and entry["refits"] == []
    with pytest.raises(EngineError, match="no engine for model 'radm_head'"):
        get_entry(manifest, "radm_head", tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "engines": {}}))
    with pytest.raises(EngineError, match="build the engines again"):
        read_manifest(tmp_path)


def test_checked_plan_for_the_repository_builder(tmp_path):
    from posterrt.engines.manifest import checked_plan

    update_entry(tmp_path, "bg_unet", _entry())
    with pytest.raises(EngineError, match="plan bg_unet.plan of 'bg_unet' is missing"):
        checked_plan(tmp_path, "bg_unet", H100, "10.9.0.34")
    (tmp_path / "bg_unet.plan").write_bytes(b"plan")
    assert checked_plan(tmp_path, "bg_unet", H100, "10.9.0.34", "ab" * 32) == tmp_path / "bg_unet.plan"
    with pytest.raises(EngineError, match="TensorRT 10.9.0.34, this is TensorRT 11.4.0.106"):
        checked_plan(tmp_path, "bg_unet", H100, "11.4.0.106")


def test_compatible_engine_passes():
    check_engine_compatible(_entry(), H100, "10.9.0.34", source_onnx_sha256="ab" * 32)
    check_engine_compatible(_entry(), H100, "10.9.0.34")  # no bundle at hand: hash not checked


@pytest.mark.parametrize("gpu, trt, sha, message", [
    (GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"), "10.9.0.34", None, "built for GPU 'NVIDIA H100 80GB HBM3'"),
    (GpuInfo("NVIDIA H200", "9.0"), "10.9.0.34", None, "this GPU is 'NVIDIA H200'"),
    (H100, "10.13.0.35", None, "built with TensorRT 10.9.0.34, this is TensorRT 10.13.0.35"),
    (H100, "10.9.0.34", "cd" * 32, "the bundle now holds cdcdcdcdcdcd"),
])
def test_incompatible_engine_says_rebuild(gpu, trt, sha, message):
    with pytest.raises(EngineError, match=re.escape(message)) as caught:
        check_engine_compatible(_entry(), gpu, trt, source_onnx_sha256=sha)
    assert "rebuild it: posterrt engines build --models bg_unet" in str(caught.value)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Precision policy on a small graph with the classic fp16 traps
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trap_onnx(tmp_path_factory) -> Path:
    """Conv + GroupNorm + attention + LayerNorm + a sinusoidal timestep embedding (t up to 1000)."""
    import torch

    class Trap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 32, 3, padding=1)
            self.norm = torch.nn.GroupNorm(8, 32)
            self.qkv = torch.nn.Linear(32, 96)
            self.ln = torch.nn.LayerNorm(32)
            self.time = torch.nn.Linear(32, 32)
            self.out = torch.nn.Conv2d(32, 4, 3, padding=1)

        def forward(self, x, t):
            freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
            angle = t[:, None] * freqs[None]
            emb = self.time(torch.cat([torch.sin(angle), torch.cos(angle)], -1))
            h = torch.nn.functional.silu(self.norm(self.conv(x))) + emb[:, :, None, None]
            b, c, height, width = h.shape
            seq = h.flatten(2).transpose(1, 2)
            q, k, v = self.qkv(seq).chunk(3, -1)
            seq = self.ln(seq + torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), -1) @ v)
            return self.out(seq.transpose(1, 2).reshape(b, c, height, width))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trap") / "trap.onnx"
    with torch.no_grad():
        torch.onnx.export(Trap().eval(), (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 5.0])), str(path),
                          input_names=["x", "t"], output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}, "y": {0: "b", 2: "h", 3: "w"}})
    return path


def _run(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fp16_policy_keeps_timestep_embedding_and_norms_in_fp32(trap_onnx, tmp_path):
    model = onnx.load(str(trap_onnx))
    kept = set(fp32_node_names(model))
    kept_types = {node.op_type for node in model.graph.node if node.name in kept}
    assert {"Sin", "Cos", "Mul", "InstanceNormalization", "LayerNormalization", "Softmax"} <= kept_types
    assert not kept_types & {"Conv", "MatMul", "Gemm"}  # the heavy ops run in fp16
    converted = convert_precision(model, "fp16")
    onnx.checker.check_model(converted)
    producer = {out: node for node in converted.graph.node for out in node.output}
    for node in converted.graph.node:
        if node.op_type in ("Sin", "Cos"):
            parent = producer[node.input[0]]  # fed by the fp32 Mul itself, not by a cast back from fp16
            assert parent.op_type == "Mul", parent
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [onnx.TensorProto.FLOAT] * 2
    fp16_path = tmp_path / "trap16.onnx"
    onnx.save(converted, str(fp16_path))
    rng = np.random.default_rng()
    for t in ([999.0, 10.0], [517.3, 1.0]):  # large timesteps: where an fp16 embedding is noise
        feeds = {"x": rng.standard_normal((2, 4, 16, 24)).astype(np.float32), "t": np.array(t, np.float32)}
        error = relative_error(_run(fp16_path, feeds), _run(trap_onnx, feeds))
        assert error < 5e-3, error  # a fully fp16 conversion of this graph lands near 2e-2


def test_bf16_keeps_structure_and_rounds_weights_from_fp32(trap_onnx):
    import ml_dtypes
    from onnx import numpy_helper

    model = onnx.load(str(trap_onnx))
    fp16 = convert_precision(onnx.load(str(trap_onnx)), "fp16")
    bf16 = convert_precision(onnx.load(str(trap_onnx)), "bf16")
    assert [n.op_type for n in bf16.graph.node] == [n.op_type for n in fp16.graph.node]
    types_ = {t.data_type for t in bf16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 not in types_ and onnx.TensorProto.BFLOAT16 in types_
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight = next(t for t in bf16.graph.initializer if t.name == "conv.weight")
    raw = np.frombuffer(weight.raw_data, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(weight.dims)
    np.testing.assert_array_equal(raw, original["conv.weight"].astype(ml_dtypes.bfloat16))
    assert all(a.i != onnx.TensorProto.FLOAT16 for n in bf16.graph.node for a in n.attribute if a.name == "to")


# ---------------------------------------------------------------------------------------------
# Clean-up on tiny exported models: parity in ONNX Runtime
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from posterrt.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_bundle("tiny", BUNDLE_MODELS, out, progress=False)
    return out


@pytest.mark.parametrize("model", BUNDLE_MODELS)
def test_clean_up_keeps_parity(bundle, tmp_path, model):
    from posterrt.runtime.bundle import Bundle

    source = Bundle(bundle).model_path(model)
    contract = Bundle(bundle).contract(model)
    report = prepare_onnx(source, tmp_path / "clean.onnx", model_name=model, precision="fp32")
    assert report["nodes_after"] < report["nodes_before"] and report["tool"].startswith("onnxslim")
    parity = compare_onnx(source, tmp_path / "clean.onnx", contract, rtol=CLEAN_RTOL)
    assert parity["passed"], parity
    report16 = prepare_onnx(source, tmp_path / "fp16.onnx", model_name=model, precision="fp16")
    assert report16["fp32_nodes"] > 0
    parity16 = compare_onnx(source, tmp_path / "fp16.onnx", contract, rtol=FP16_RTOL)
    assert parity16["passed"], parity16
    assert parity16["max_rel"] > 0  # it really ran in fp16


def test_clean_up_fallback_without_onnxslim(bundle, tmp_path):
    from posterrt.runtime.bundle import Bundle

    source = Bundle(bundle).model_path("vae_decoder")
    report = prepare_onnx(source, tmp_path / "clean.onnx", model_name="vae_decoder", tool="onnxruntime")
    assert "onnxruntime" in report["tool"] and report["nodes_after"] < report["nodes_before"]
    cleaned = onnx.load(str(tmp_path / "clean.onnx"))
    assert len(cleaned.graph.value_info) > 0  # shapes were inferred
    assert all(n.domain in ("", "ai.onnx") for n in cleaned.graph.node)  # standard ops only, TensorRT parses them
    assert compare_onnx(source, tmp_path / "clean.onnx", Bundle(bundle).contract("vae_decoder"), rtol=CLEAN_RTOL)["passed"]


def _adapter_graph(path: Path, fresh: bool) -> Path:
    """y = (x @ W + B) * G: a fresh adapter has B = 0 and G = 1, a trained one other values."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"W": rng.standard_normal((8, 8)), "B": np.zeros(8) if fresh else rng.standard_normal(8),
               "G": np.ones(8) if fresh else rng.standard_normal(8)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"), helper.make_node("Add", ["h", "B"], ["b"], name="bias"),
         helper.make_node("Mul", ["b", "G"], ["y"], name="gain")], "adapter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _structure(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], sorted(t.name for t in model.graph.initializer)


def test_refittable_clean_up_keeps_the_graph_whatever_the_weights(tmp_path):
    fresh, trained = _adapter_graph(tmp_path / "fresh.onnx", True), _adapter_graph(tmp_path / "trained.onnx", False)
    for name, refittable in (("plain", False), ("refit", True)):
        prepare_onnx(fresh, tmp_path / f"{name}-fresh.onnx", model_name="bg_unet", refittable=refittable)
        prepare_onnx(trained, tmp_path / f"{name}-trained.onnx", model_name="bg_unet", refittable=refittable)
    # plain clean-up drops the zero bias and the unit gain of the fresh adapter...
    assert _structure(tmp_path / "plain-fresh.onnx") != _structure(tmp_path / "plain-trained.onnx")
    # ...a refittable one keeps every weight, so trained weights can be refitted by name later
    assert _structure(tmp_path / "refit-fresh.onnx") == _structure(tmp_path / "refit-trained.onnx")
    assert _structure(tmp_path / "refit-fresh.onnx")[1] == ["B", "G", "W"]


def test_vae_decoder_mid_block_attention_stays_fp32(bundle):
    from posterrt.runtime.bundle import Bundle

    model = onnx.load(str(Bundle(bundle).model_path("vae_decoder")))
    kept = fp32_node_names(model, "vae_decoder")
    attention = [n.name for n in model.graph.node if "mid_block/attentions" in n.name and n.op_type == "MatMul"]
    assert attention and set(attention) <= set(kept)
    assert not set(attention) & set(fp32_node_names(model, "bg_unet"))  # the pattern is per model


def test_relative_error_ignores_mask_constants_and_catches_nan():
    expected = np.array([1.0, -2.0, -1e4, -1e4])
    assert relative_error(expected + np.array([0.02, 0, 0, 8.0]), expected) == pytest.approx(8.0 / 2.0)
    assert relative_error(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == float("inf")
    assert relative_error(np.array([1.0, np.nan]), np.array([1.0, np.nan])) == 0.0


def test_clean_command_writes_models_and_report(bundle, tmp_path):
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "engines", "clean", "--bundle", str(bundle),
                             "--out", str(tmp_path), "--models", "vae_decoder", "--precision", "fp16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "clean.json").read_text())
    assert report["vae_decoder"]["parity"]["passed"] and (tmp_path / "vae_decoder.onnx").is_file()
    assert "parity max rel" in result.stdout


# ---------------------------------------------------------------------------------------------
# Build and refit up to TensorRT: a stand-in `tensorrt` module held to TensorRT's stubs
# (tests/trt_standin.py) that records what it is told
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_trt(monkeypatch):
    trt = standin(TRT_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("posterrt.engines.build.current_gpu", lambda: H100)
    monkeypatch.setattr("posterrt.engines.refit.current_gpu", lambda: H100)
    return trt


SHAPES = "height=512:512:768"


@pytest.fixture(scope="module")
def built(bundle, tmp_path_factory):
    """One fp16 build of vae_decoder + bg_unet through the stand-in (preparing the ONNX is the slow part)."""
    from posterrt.engines.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("built")
    trt = standin(TRT_VERSION)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", trt)
        patch.setattr("posterrt.engines.build.current_gpu", lambda: H100)
        options = BuildOptions(precision="fp16", opt_level=5, workspace_gb=1.5, shapes=profiles.parse_shapes(SHAPES))
        manifest = build_engines(bundle, out, ["vae_decoder", "bg_unet"], options, progress=False)
    return out, trt, manifest


def test_build_passes_profile_precision_and_options(built, bundle):
    from posterrt.runtime.bundle import Bundle

    out, trt, manifest = built
    configs = trt.calls["configs"]
    assert len(configs) == 2
    for config, model in zip(configs, ("vae_decoder", "bg_unet")):
        expected = profiles.model_profile(Bundle(bundle).contract(model), profiles.parse_shapes(SHAPES))
        assert config.num_optimization_profiles == 1
        (profile,) = config._profiles
        assert {n: profile.get_shape(n) for n in expected} == {n: (s["min"], s["opt"], s["max"]) for n, s in expected.items()}
        assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == int(1.5 * (1 << 30))
        assert config.builder_optimization_level == 5
        assert not config.get_flag(trt.BuilderFlag.FP16)  # strongly typed, no weak-typing flags
        assert config.get_flag(trt.BuilderFlag.TF32)  # left on below fp32
        assert config.get_flag(trt.BuilderFlag.REFIT) == (model == "bg_unet")
    plan = json.loads((out / "bg_unet.plan").read_bytes())
    assert plan["network_flags"] == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 2  # the stubs' value
    assert plan["inputs"] == list(CONTRACTS["bg_unet"].input_names)
    assert onnx.TensorProto.FLOAT16 in plan["initializer_types"]  # the fp16 ONNX reached the parser
    assert "[INFO] building" in (out / "bg_unet.build.log").read_text()

    entry = manifest["engines"]["bg_unet"]
    assert entry["source_onnx_sha256"] == Bundle(bundle).models["bg_unet"].sha256
    assert entry["gpu"]["compute_capability"] == "9.0" and entry["tensorrt_version"] == TRT_VERSION
    assert entry["ranges"]["height"] == {"min": 512, "opt": 512, "max": 768}
    assert entry["build_options"]["refittable"] and entry["build_options"]["opt_level"] == 5
    assert "dead_node_elimination" in entry["onnx_prepare"]["skipped_optimizations"]  # refit-safe clean-up
    vae_entry = read_manifest(out)["engines"]["vae_decoder"]
    assert vae_entry["precision"] == "fp16" and vae_entry["onnx_prepare"]["skipped_optimizations"] == ["weight_tying"]
    assert (out / "timing.cache").read_bytes() == b"++"  # one cache, carried from model to model
    assert not [p for p in out.iterdir() if p.name.startswith("posterrt-")]  # work folders removed


def test_fp32_build_reuses_the_timing_cache_and_turns_tf32_off(fake_trt, built, bundle, tmp_path):
    from posterrt.engines.build import BuildOptions, build_engines

    cache = tmp_path / "shared.cache"
    cache.write_bytes((built[0] / "timing.cache").read_bytes())
    build_engines(bundle, tmp_path, ["vae_decoder"], BuildOptions(precision="fp32", timing_cache=cache), progress=False)
    assert cache.read_bytes() == b"+++"  # read, extended, written back
    (config,) = fake_trt.calls["configs"]
    assert not config.get_flag(fake_trt.BuilderFlag.TF32) and not config.get_flag(fake_trt.BuilderFlag.REFIT)
    assert onnx.TensorProto.FLOAT16 not in json.loads((tmp_path / "vae_decoder.plan").read_bytes())["initializer_types"]


def test_refit_maps_the_new_onnx_with_the_recorded_precision(fake_trt, built, bundle, tmp_path):
    import shutil

    from posterrt.engines.refit import refit_engine
    from posterrt.runtime.bundle import Bundle

    engines = tmp_path / "engines"
    shutil.copytree(built[0], engines)
    new_onnx = Bundle(bundle).model_path("bg_unet")
    entry = refit_engine(engines / "bg_unet.plan", new_onnx)
    assert entry["refits"][-1]["weights"] == 7 and entry["refits"][-1]["sha256"] == Bundle(bundle).models["bg_unet"].sha256
    refitted_types = json.loads((engines / "bg_unet.plan").read_bytes())["refitted_from"]
    assert onnx.TensorProto.FLOAT16 in refitted_types  # prepared with the engine's recorded fp16 policy
    assert len(read_manifest(engines)["engines"]["bg_unet"]["refits"]) == 1
    with pytest.raises(EngineError, match="built without REFIT"):
        refit_engine(engines / "vae_decoder.plan", Bundle(bundle).model_path("vae_decoder"))
    fake_trt.__version__ = "10.14.1.48"
    with pytest.raises(EngineError, match=f"built with TensorRT {TRT_VERSION}"):
        refit_engine(engines / "bg_unet.plan", new_onnx)
    with pytest.raises(EngineError, match="lists no such plan"):
        refit_engine(engines / "timing.cache", new_onnx)


def test_build_and_refit_on_tensorrt_11(bundle, tmp_path, monkeypatch):
    """TensorRT 11: strongly typed always (the flag is accepted), the weak-typing flags gone. The
    same code path builds and refits; the stand-in refuses any removed flag it would touch."""
    from posterrt.engines.build import BuildOptions, build_engines
    from posterrt.engines.refit import refit_engine
    from posterrt.runtime.bundle import Bundle

    trt = standin("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("posterrt.engines.build.current_gpu", lambda: H100)
    monkeypatch.setattr("posterrt.engines.refit.current_gpu", lambda: H100)
    manifest = build_engines(bundle, tmp_path, ["bg_unet"], BuildOptions(precision="fp16"), progress=False)
    assert manifest["engines"]["bg_unet"]["tensorrt_version"] == "11.4.0.106"
    (config,) = trt.calls["configs"]
    assert config.get_flag(trt.BuilderFlag.REFIT) and config.get_flag(trt.BuilderFlag.TF32)
    refit_engine(tmp_path / "bg_unet.plan", Bundle(bundle).model_path("bg_unet"))
    assert json.loads((tmp_path / "bg_unet.plan").read_bytes())["refitted_from"]


def test_fp32_build_without_a_tf32_flag(bundle, tmp_path, monkeypatch):
    """build_plan clears TF32 only where BuilderFlag has it: the branch for a TensorRT without the flag."""
    from posterrt.engines.build import BuildOptions, build_engines

    trt = standin("11.4.0.106", removed={"BuilderFlag": ("TF32",)})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("posterrt.engines.build.current_gpu", lambda: H100)
    with pytest.raises(AttributeError, match="BuilderFlag.TF32 was removed"):
        trt.BuilderFlag.TF32
    build_engines(bundle, tmp_path, ["vae_decoder"], BuildOptions(precision="fp32", refittable=()), progress=False)
    (config,) = trt.calls["configs"]
    assert not config.get_flag(trt.BuilderFlag.REFIT)


@pytest.mark.parametrize("module, message", [
    (types.ModuleType("tensorrt"), "TensorRT is not installed, only its type stubs"),  # tensorrt-stubs alone
    (standin("8.6.1"), "TensorRT 8.6.1 is installed; posterrt builds with TensorRT 10.x or 11.x"),
])
def test_tensorrt_that_cannot_build_is_named(monkeypatch, module, message):
    from posterrt.engines.build import TensorRTMissing, import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", module)
    with pytest.raises(TensorRTMissing, match=re.escape(message)):
        import_tensorrt()


def test_build_options_are_validated():
    from posterrt.engines.build import BuildOptions

    with pytest.raises(InputError, match="--opt-level: got 9"):
        BuildOptions(opt_level=9)
    with pytest.raises(InputError, match="--workspace-gb: got 0"):
        BuildOptions(workspace_gb=0)
    with pytest.raises(InputError, match="--precision: unknown precision 'int8'"):
        BuildOptions(precision="int8")


def _cli_without_tensorrt(*args):
    blocker = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorrt":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from posterrt.runtime.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    return subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True)


def test_build_without_tensorrt_says_so_in_one_line_and_exits_2(tmp_path):
    result = _cli_without_tensorrt("engines", "build", "--bundle", str(tmp_path), "--out", str(tmp_path / "e"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU)"]
    assert not (tmp_path / "e").exists()
    refit = _cli_without_tensorrt("engines", "refit", "--engine", "x.plan", "--onnx", "x.onnx")
    assert refit.returncode == 2 and "TensorRT is not installed" in refit.stderr


def test_engine_helpers_import_without_torch_or_tensorrt():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "tensorrt", "diffusers", "transformers"):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import posterrt.runtime.profiles, posterrt.engines.manifest, posterrt.engines.cleanup
        import posterrt.engines.build, posterrt.engines.refit, posterrt.engines.cli
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py
# ---------------------------------------------------------------------------------------------
def test_gpu_check_runs_its_whole_flow_on_cpu_with_the_stand_in(monkeypatch):
    """benchmarks/gpu_check.py end to end for the tiny bg_unet on the CPU: export, ONNX Runtime
    reference, the engines' fp16 preparation and build_plan, a PlanRunner bound to torch tensors,
    refit with other weights, timings. The stand-in's "engine" runs the plan's ONNX in ONNX Runtime
    at the bound addresses, so binding, shapes, dtypes, profile and refit are exercised for real;
    every TensorRT call is held to the stubs. The figures mean nothing (CPU)."""
    from posterrt.benchmarks import gpu_check

    trt = standin(TRT_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    lines = []
    results = gpu_check.run_checks(gpu_check.parse_runs("tiny:bg_unet"), "cpu", repeats=2, log=lines.append)
    (row,) = results["results"]
    assert "error" not in row, row
    assert results["failed"] == [] and results["machine"]["tensorrt"] == TRT_VERSION
    assert row["tensorrt_fp16_vs_onnxruntime_fp32"]["passed"]
    assert 0 < max(row["tensorrt_fp16_vs_onnxruntime_fp32"]["max_rel"].values()) <= FP16_RTOL  # fp16 vs fp32: not 0
    refit = row["refit"]
    assert refit["moved"] and refit["tensorrt_vs_onnxruntime_new_weights"]["passed"], refit
    assert row["latency"]["tensorrt_fp16"]["n"] == 2 and row["latency"]["torch"]["p50_ms"] > 0
    assert row["latency"]["torch_mode"] == "fp32 (cpu)"  # fp16 on a GPU; the CPU's fp16 kernels take seconds
    (context,) = trt.calls["contexts"]
    assert context._runs == 1 + 1 + 1 + 2  # parity, refit, one warm-up, two timed runs
    assert set(row["stage_seconds"]) == {"build_module", "export_and_prepare", "onnxruntime_reference",
                                         "tensorrt_build", "tensorrt_parity", "refit", "latency"}
    assert lines[0].startswith("tiny  bg_unet      parity ") and "refit 7 weights" in lines[0]


def test_gpu_check_command_refuses_what_it_cannot_run(capsys):
    from posterrt.benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--runs", "tiny:bg_unett"]) == 2
    assert "bg_unett" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--runs", "bg_unet"]) == 2
    assert "--runs: 'bg_unet' is not PRESET:MODEL" in capsys.readouterr().err


def test_gpu_check_on_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (none visible to torch here); run python -m posterrt.benchmarks.gpu_check on one")
    from posterrt.benchmarks import gpu_check
    from posterrt.engines.build import TensorRTMissing, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTMissing as error:
        pytest.skip(f"needs TensorRT: {error}")
    results = gpu_check.run_checks(gpu_check.parse_runs("tiny:bg_unet"), "cuda", repeats=5)
    assert results["failed"] == [], results


def test_build_command_end_to_end_with_the_stand_in(fake_trt, bundle, tmp_path, capsys):
    from posterrt.runtime.cli import main

    out = tmp_path / "engines"
    code = main(["engines", "build", "--bundle", str(bundle), "--out", str(out), "--models", "vae_decoder",
                 "--precision", "fp32", "--shapes", "height=512,width=512:768:1024,batch=1:1:2", "--quiet"])
    assert code == 0
    assert "vae_decoder" in capsys.readouterr().out
    (config,) = fake_trt.calls["configs"]
    assert config._profiles[0].get_shape("latent") == ([1, 4, 64, 64], [1, 4, 64, 96], [2, 4, 64, 128])
    entry = read_manifest(out)["engines"]["vae_decoder"]
    assert entry["precision"] == "fp32" and not entry["build_options"]["refittable"]
    assert main(["engines", "build", "--bundle", str(bundle), "--out", str(out), "--shapes", "height=100"]) == 2
    assert capsys.readouterr().err.strip() == "error: --shapes: 'height=100' leaves the contract range of 'height' " \
                                              "(256..1024); requests are validated against it"
