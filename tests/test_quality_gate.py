"""The quality gate on the tiny preset: deterministic figures, an exact copy passes, a variant with
perturbed weights is refused (by the gate's own check and by `optimize`, which then writes nothing)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from posterrt.engines import ort_optimize, quality_gate
from posterrt.engines.quality_gate import APPROXIMATE, EXACT, Tolerances
from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.errors import ParityError

MODEL = "bg_unet"


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate") / "tiny"
    shutil.copytree(tiny_bundle, folder)
    return folder


def perturbed_copy(source, target, relative_noise: float, seed: int = 0) -> None:
    """The model with every Conv weight multiplied by (1 + noise): a 'variant' that is wrong by a
    known amount, as a broken quantization or a bad weight conversion would be."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in conv_weights:
            values = numpy_helper.to_array(tensor)
            noisy = values * (1 + relative_noise * rng.standard_normal(values.shape)).astype(np.float32)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), tensor.name))
    onnx.save(model, str(target))


def test_the_original_as_its_own_variant_is_exact(bundle_dir):
    bundle = Bundle(bundle_dir)
    report = quality_gate.run_gate(bundle, MODEL, bundle.model_path(MODEL), EXACT, steps=3)
    figures = report["figures"]
    assert report["passed"] and figures["noise_max_rel"] == 0.0
    assert math.isinf(figures["latent_psnr_db"]) and math.isinf(figures["image_psnr_db"])
    assert len(figures["steps"]) == 3 and figures["loop_steps"] == 3


def test_gate_is_deterministic(bundle_dir, tmp_path):
    bundle = Bundle(bundle_dir)
    variant = tmp_path / "noisy.onnx"
    perturbed_copy(bundle.model_path(MODEL), variant, 0.01)
    first = quality_gate.run_gate(bundle, MODEL, variant, APPROXIMATE, steps=3)
    second = quality_gate.run_gate(bundle, MODEL, variant, APPROXIMATE, steps=3)
    assert first == second
    assert 0 < first["figures"]["noise_rel_rms"] < 0.1  # 1% weight noise: a small, nonzero error


def test_perturbed_weights_fail_with_the_check_and_the_amount(bundle_dir, tmp_path):
    bundle = Bundle(bundle_dir)
    variant = tmp_path / "broken.onnx"
    perturbed_copy(bundle.model_path(MODEL), variant, 0.5)
    report = quality_gate.run_gate(bundle, MODEL, variant, APPROXIMATE, steps=3)
    assert not report["passed"]
    text = "; ".join(report["failures"])
    assert "image PSNR" in text and "dB short" in text
    with pytest.raises(ParityError, match=r"bg_unet int8: quality gate failed: .*dB short"):
        quality_gate.require_pass(report, "bg_unet int8")


def test_judge_names_each_check_and_by_how_much():
    figures = {"noise_max_rel": 3e-4, "noise_rel_rms": 0.2, "latent_psnr_db": 40.0, "image_psnr_db": 21.5}
    failures = quality_gate.judge(figures, Tolerances(noise_max_rel=1e-4, noise_rel_rms=0.1,
                                                      latent_psnr_db=25.0, image_psnr_db=30.0))
    assert failures == ["noise prediction max relative error 0.0003 > 0.0001 (3.0x the tolerance)",
                        "noise prediction relative RMS error 0.2 > 0.1 (2.0x the tolerance)",
                        "image PSNR 21.5 dB < 30.0 dB (8.5 dB short)"]
    assert quality_gate.judge(figures, Tolerances()) == []


def test_optimize_refuses_a_variant_that_fails_and_writes_nothing(bundle_dir, monkeypatch):
    before = (bundle_dir / MANIFEST).read_text()
    files_before = sorted(p.name for p in bundle_dir.iterdir())

    def broken_build(bundle, model, variant, target, gate_options=None):
        perturbed_copy(bundle.model_path(model), target, 0.05)
        return {"note": "weights perturbed on purpose"}

    monkeypatch.setattr(ort_optimize, "build_variant", broken_build)
    with pytest.raises(ParityError, match=r"bg_unet fp32-opt: quality gate failed: noise prediction max relative "
                                          r"error .* > 0\.0001 \(.*x the tolerance\)"):
        ort_optimize.optimize_bundle(bundle_dir, "fp32-opt", [MODEL], gate_options={"steps": 2},
                                     progress=lambda _: None)
    assert (bundle_dir / MANIFEST).read_text() == before
    assert sorted(p.name for p in bundle_dir.iterdir()) == files_before
    assert "variants" not in json.loads(before) or "fp32-opt" not in json.loads(before)["variants"].get(MODEL, {})


def test_calibration_inputs_follow_the_loop_and_avoid_gate_seeds(bundle_dir):
    bundle = Bundle(bundle_dir)
    contract = bundle.contract(MODEL)
    reference = quality_gate.ort_step(bundle.model_path(MODEL), contract)
    inputs = quality_gate.calibration_inputs(reference, bundle, MODEL, requests=1, steps=3)
    assert len(inputs) == 3
    timesteps = [float(x["timestep"][0]) for x in inputs]
    assert timesteps == sorted(timesteps, reverse=True)  # noisy first, clean last
    assert all(x["sample"].shape[0] == 2 for x in inputs)  # guided: uncond + cond rows
    gate_request = quality_gate.make_request(contract, quality_gate.GATE_SEEDS[0], quality_gate.gate_sizes(), 7.5)
    assert not np.array_equal(inputs[0]["sample"][:1], gate_request.noise)


def test_generic_models_get_per_output_errors(bundle_dir):
    bundle = Bundle(bundle_dir)
    report = quality_gate.run_gate(bundle, "vae_decoder", bundle.model_path("vae_decoder"), EXACT)
    assert report["passed"] and report["figures"]["noise_max_rel"] == 0.0 and report["figures"]["requests"] == []
