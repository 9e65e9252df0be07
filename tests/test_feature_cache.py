"""The cached-step graphs of each UNet (DeepCache): contracts, the PyTorch modules, the exported
pair sharing one weights file, parity against PyTorch on fresh random inputs; and the gate that makes
an interval a bundle's default (engines/cache_interval.py). The sampler's alternation and its
backend agreement are tested with the pipelines (tests/test_pipelines.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from posterrt.export.bundle_writer import Sources
from posterrt.export.networks.feature_cache import check_cacheable
from posterrt.export.registry import MODEL_FAMILY, WEIGHTS_FROM, family_module, with_weight_sharers
from posterrt.runtime import profiles
from posterrt.runtime.accuracy import FEATURE_CACHE_GATE
from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.contracts import get_contract
from posterrt.runtime.errors import CheckpointError, InputError, ParityError
from posterrt.runtime.families import unet_families
from posterrt.runtime.samples import default_sizes

CACHED_STEPS = {unet: family.cached_steps for unet, family in unet_families().items()}
PLAIN_STEPS = tuple(CACHED_STEPS)
#: fp32 parity: the export's bound (export/spec.py FP32_RTOL), relative to the output's scale.
FP32_RTOL = 1e-4


def fresh_seed() -> int:
    return int.from_bytes(np.random.bytes(4), "little")


def build(model: str):
    return family_module(MODEL_FAMILY[model]).build(model, "tiny", Sources())


def test_contracts_add_the_deep_feature_and_keep_the_plain_step():
    for plain, (deep, shallow) in CACHED_STEPS.items():
        plain_c, deep_c, shallow_c = (get_contract(m) for m in (plain, deep, shallow))
        assert deep_c.inputs == plain_c.inputs and deep_c.output_names == ["noise_pred", "deep_feature"]
        assert shallow_c.input_names == [*plain_c.input_names, "deep_feature"]
        assert shallow_c.outputs == plain_c.outputs
        assert deep_c.output("deep_feature") == shallow_c.input("deep_feature")
        assert deep_c.output("deep_feature").shape == ("cfg_batch", "deep_channels", "height/8", "width/8")
        assert "deep_feature" not in plain_c.output_names  # the plain step stays as it is


@pytest.mark.parametrize("plain", PLAIN_STEPS)
def test_tensorrt_profiles_follow_the_contracts(plain):
    """The deep feature is profiled like the latent it sits beside: same batch and spatial ranges."""
    deep, shallow = CACHED_STEPS[plain]
    static = {dim: 7 for dim in get_contract(shallow).static_dims}
    profile = profiles.model_profile(get_contract(shallow).resolve(static))
    for key in profiles.PROFILE_KEYS:
        sample, feature = profile["sample"][key], profile["deep_feature"][key]
        assert feature == [sample[0], 7, *sample[2:]], key
    assert profiles.model_profile(get_contract(deep).resolve(static)) == \
        profiles.model_profile(get_contract(plain).resolve(static))


@pytest.mark.parametrize("plain", PLAIN_STEPS)
def test_deep_step_is_the_plain_step_and_shallow_step_completes_it(plain):
    """At the step that filled the cache, the shallow path on that feature is the plain step: the cut
    loses nothing by itself (a shallow step differs only by the feature's age)."""
    deep, shallow = CACHED_STEPS[plain]
    modules = {m: build(m) for m in (plain, deep, shallow)}
    inputs = modules[plain].inputs(default_sizes("other"), seed=fresh_seed())
    args = [torch.from_numpy(inputs[n]) for n in modules[plain].contract.input_names]
    with torch.no_grad():
        want = modules[plain].module(*args)[0]
        noise, feature = modules[deep].module(*args)
        got = modules[shallow].module(*args, feature)[0]
    assert torch.equal(noise, want)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    assert modules[deep].static_dims["deep_channels"] == feature.shape[1]


def test_a_uncacheable_unet_is_refused_by_name():
    from diffusers import UNet2DConditionModel

    from posterrt.export.networks.stable_diffusion import unet_config

    unet = UNet2DConditionModel(**{**unet_config("tiny"), "class_embed_type": "timestep"})
    with pytest.raises(CheckpointError, match="class_embed_type"):
        check_cacheable(unet, "bg_unet")


def test_the_two_graphs_are_exported_together():
    assert with_weight_sharers(["bg_unet_shallow"]) == ["bg_unet_deep", "bg_unet_shallow"]
    assert with_weight_sharers(["render_unet_deep", "vae_decoder"]) == ["vae_decoder", "render_unet_deep",
                                                                      "render_unet_shallow"]
    assert with_weight_sharers(["bg_unet"]) == ["bg_unet"]


@pytest.mark.parametrize("plain", PLAIN_STEPS)
def test_exported_pair_shares_one_weights_file_and_passed_parity(tiny_bundle, plain):
    deep, shallow = CACHED_STEPS[plain]
    bundle = Bundle(tiny_bundle)
    assert WEIGHTS_FROM[shallow] == deep
    data = bundle.models[deep].data_files
    assert data == [f"{deep}.onnx.data"] and bundle.models[shallow].data_files == data
    shallow_graph = onnx.load(str(bundle.model_path(shallow)), load_external_data=False).graph
    external = [t for t in shallow_graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in shallow_graph.initializer)
    # the shallow graph's large tensors all come from the deep graph's file; only sub-1 KB ones stay inline
    assert sum(int(np.prod(t.dims)) * 4 for t in external) > 0.9 * weight_bytes
    # the first down block's downsampler feeds only skipped blocks: not in the shallow graph
    strided = [n for n in shallow_graph.node if n.op_type == "Conv"
               and any(a.name == "strides" and list(a.ints) != [1, 1] for a in n.attribute)]
    assert strided == []
    for model in (deep, shallow):
        parity = bundle.manifest["models"][model]["parity"]
        assert parity["passed"] and parity["max_rel"] <= FP32_RTOL, model


@pytest.mark.parametrize("plain", PLAIN_STEPS)
def test_exported_shallow_on_exported_deep_feature_matches_pytorch(tiny_bundle, plain):
    """ONNX Runtime on both exported graphs, chained as a sampler chains them, against the PyTorch plain
    step on fresh random inputs."""
    from posterrt.runtime.backends.onnxruntime import OrtBackend

    deep, shallow = CACHED_STEPS[plain]
    exportable = build(plain)
    inputs = exportable.inputs(default_sizes("small"), seed=fresh_seed())
    with torch.no_grad():
        want = exportable.module(*(torch.from_numpy(inputs[n]) for n in exportable.contract.input_names))[0].numpy()
    with OrtBackend(Bundle(tiny_bundle), intra_op_threads=2) as backend:
        feature = backend.run(deep, inputs)["deep_feature"]
        got = backend.run(shallow, {**inputs, "deep_feature": feature})["noise_pred"]
    assert float(np.abs(got - want).max()) <= FP32_RTOL * float(np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# The gate: a default interval only if cached output passes against uncached output
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    import shutil

    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_a_passing_interval_becomes_the_default_the_pipelines_use(bundle_copy):
    from posterrt.engines.cache_interval import report_path, set_default_interval
    from posterrt.runtime.backends.base import Backend
    from posterrt.runtime.backends.onnxruntime import OrtBackend
    from posterrt.runtime.pipelines import build_pipeline
    from posterrt.runtime.pipelines.request import PosterRequest

    report = set_default_interval(bundle_copy, 2, ["background"], cases=1)
    assert report["gate"]["passed"] and report_path(bundle_copy, 2).is_file()
    entry = report["pipelines"]["background"]
    assert entry["image"]["min_psnr_db"] >= FEATURE_CACHE_GATE.psnr_db  # cached output, not identical output
    bundle = Bundle(bundle_copy)
    assert bundle.config["stable_diffusion"]["cache_interval"] == 2
    assert "cache_interval" not in bundle.config["rendernet"]  # not gated: no default
    calls = []

    class Recording(Backend):
        def __init__(self, inner):
            super().__init__(inner.bundle)
            self.inner = inner

        def run(self, model, inputs):  # steps of a bound model come through here too (Backend.bind)
            calls.append(model)
            return self.inner.run(model, inputs)

        def _run(self, contract, inputs):
            raise AssertionError("run() is overridden")

    product = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    with OrtBackend(bundle, intra_op_threads=2) as inner:
        build_pipeline("background", Recording(inner), progress=False)(
            PosterRequest(product=product, product_mask=mask, size=(256, 256), steps=3))
    assert [c for c in calls if c.startswith("bg_unet")] == ["bg_unet_deep", "bg_unet_shallow", "bg_unet_deep"]


def test_the_gate_refuses_a_failing_interval_and_records_nothing(bundle_copy):
    """Interval 5 over 20 steps moves the tiny background's image by ~33 dB: under the fp32 bounds (40 dB)
    that fails, and the refusal names the pipeline and the figure."""
    from posterrt.engines.cache_interval import report_path, set_default_interval
    from posterrt.runtime.accuracy import FP32_GATE

    before = (bundle_copy / MANIFEST).read_text()
    with pytest.raises(ParityError, match=r"cache interval 5: accuracy gate failed: background: PSNR \d+\.\d dB < 40 dB"):
        set_default_interval(bundle_copy, 5, ["background"], cases=1, steps=20, thresholds=FP32_GATE)
    assert (bundle_copy / MANIFEST).read_text() == before
    assert json.loads(report_path(bundle_copy, 5).read_text())["gate"]["passed"] is False


def test_the_gate_names_bad_arguments(tiny_bundle):
    from posterrt.runtime.accuracy import gate_feature_cache

    with pytest.raises(InputError, match="--interval: got 1"):
        gate_feature_cache(tiny_bundle, 1)
    with pytest.raises(InputError, match="--pipelines"):
        gate_feature_cache(tiny_bundle, 2, ["layout"])


def test_the_cli_gates_the_measured_interval_unless_told_another():
    """``posterrt engines cache-interval`` without --interval gates 4 (benchmarks/RESULTS.md, issue 18)."""
    import argparse

    from posterrt.engines.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["cache-interval", "--bundle", "b"]).interval == 4
    assert parser.parse_args(["cache-interval", "--bundle", "b", "--interval", "2"]).interval == 2
