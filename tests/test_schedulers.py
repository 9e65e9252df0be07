"""The numpy UNet samplers against diffusers, step for step, and the guidance helpers.

Parity protocol: the same config goes to our scheduler and to the diffusers one, both run the same
timesteps on the same float32 sample, fed the same random "model outputs" for 10 steps. Tolerance:
max |ours - diffusers| / max |diffusers| <= 1e-5 at every step. Both sides compute in float32 with
the same formulas; what differs is rounding order (our per-step coefficients are double,
diffusers' float32) and torch.linspace's float32 betas vs numpy's (<= 1 ulp), which measure at
<~1e-6 after 10 steps: 1e-5 leaves a decade of margin while a wrong formula or an off-by-one
timestep shows as O(1e-2) or more.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from posterrt.runtime.errors import InputError  # noqa: E402
from posterrt.runtime.schedulers import (SCHEDULERS, batch_for_guidance, combine_guidance,  # noqa: E402
                                         get_scheduler, uses_guidance)

#: The scheduler config SD 1.5 bundles carry.
SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"}

REFERENCE = {
    "ddim": lambda cfg: diffusers.DDIMScheduler.from_config(cfg),
    "ddpm": lambda cfg: diffusers.DDPMScheduler.from_config(cfg),
    "dpmsolver++": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"),
    "euler": lambda cfg: diffusers.EulerDiscreteScheduler.from_config(cfg),
}
RTOL = 1e-5
SHAPE = (2, 4, 8, 8)


def relative_error(ours: np.ndarray, reference) -> float:
    reference = reference.numpy() if hasattr(reference, "numpy") else reference
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def run_both(name, config, steps=10, seed=0, eta=0.0):
    """Run ours and diffusers side by side; returns the worst relative error over all steps."""
    ours, reference = get_scheduler(name, config), REFERENCE[name](config)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    assert ours.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(seed)
    sample = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    ref_sample = torch.from_numpy(sample.copy())
    # The stochastic samplers draw their noise from twin torch generators: diffusers from one, and
    # the numpy side receives the very same draws as variance_noise.
    ref_generator, twin_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    worst = 0.0
    for t in ours.timesteps:
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        ref_t = reference.timesteps[list(ours.timesteps).index(t)]
        scaled = ours.scale_model_input(sample, t)
        worst = max(worst, relative_error(scaled, reference.scale_model_input(ref_sample, ref_t)))
        out_t = torch.from_numpy(model_output)
        if name == "ddpm":
            noise = torch.randn(SHAPE, generator=twin_generator) if t > 0 else None
            sample = ours.step(model_output, t, sample, variance_noise=None if noise is None else noise.numpy())
            ref_sample = reference.step(out_t, ref_t, ref_sample, generator=ref_generator).prev_sample
        elif name == "ddim" and eta > 0:
            noise = torch.randn(SHAPE, generator=twin_generator)
            sample = ours.step(model_output, t, sample, eta=eta, variance_noise=noise.numpy())
            ref_sample = reference.step(out_t, ref_t, ref_sample, eta=eta, variance_noise=noise).prev_sample
        else:
            sample = ours.step(model_output, t, sample)
            ref_sample = reference.step(out_t, ref_t, ref_sample).prev_sample
        assert sample.dtype == np.float32 and sample.shape == SHAPE
        worst = max(worst, relative_error(sample, ref_sample))
    return worst


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sd15_config_matches_diffusers(name):
    assert run_both(name, SD15) <= RTOL


@pytest.mark.parametrize("name,steps", [("ddim", 50), ("dpmsolver++", 25), ("dpmsolver++", 1), ("euler", 30),
                                        ("ddpm", 4), ("dpmsolver++", 2)])
def test_other_step_counts_match_diffusers(name, steps):
    # 25 DPM steps leave the "< 15 steps" lower-order-final rule; 1 and 2 steps hit its edges.
    assert run_both(name, SD15, steps=steps, seed=steps) <= RTOL


@pytest.mark.parametrize("name,schedule,prediction,spacing", list(itertools.product(
    sorted(SCHEDULERS), ("linear", "scaled_linear", "squaredcos_cap_v2"), ("epsilon", "v_prediction", "sample"),
    ("leading", "trailing", "linspace"))))
def test_config_matrix_matches_diffusers(name, schedule, prediction, spacing):
    config = dict(SD15, beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing)
    assert run_both(name, config, steps=7) <= RTOL


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers_with_the_same_noise(eta):
    assert run_both("ddim", SD15, eta=eta) <= RTOL


def test_ddim_dpm_heun_and_clipping_options_match_diffusers():
    assert run_both("ddim", dict(SD15, clip_sample=True, clip_sample_range=0.5, prediction_type="sample")) <= RTOL
    assert run_both("dpmsolver++", dict(SD15, solver_type="heun")) <= RTOL
    assert run_both("dpmsolver++", dict(SD15, final_sigmas_type="sigma_min", lower_order_final=False)) <= RTOL
    assert run_both("ddpm", dict(SD15, variance_type="fixed_large")) <= RTOL


def test_schedules_match_diffusers_to_float32_rounding():
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = dict(SD15, beta_schedule=schedule)
        ours, reference = get_scheduler("ddim", config), REFERENCE["ddim"](config)
        # torch.linspace rounds in float32 with a vectorized kernel; numpy in double: <= ~1 ulp apart.
        np.testing.assert_allclose(ours.betas, reference.betas.numpy(), rtol=5e-7)
        np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6)


def test_stochastic_steps_are_reproducible_from_a_numpy_generator():
    def run(seed):
        scheduler = get_scheduler("ddim", SD15, eta=1.0)
        scheduler.set_timesteps(5)
        sample = np.ones(SHAPE, np.float32)
        generator = np.random.default_rng(seed)
        for t in scheduler.timesteps:
            sample = scheduler.step(np.zeros(SHAPE, np.float32), t, sample, generator=generator)
        return sample

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    with pytest.raises(InputError, match="either generator or variance_noise"):
        scheduler = get_scheduler("ddpm", SD15)
        scheduler.set_timesteps(3)
        scheduler.step(np.zeros(SHAPE, np.float32), scheduler.timesteps[0], np.zeros(SHAPE, np.float32),
                       generator=np.random.default_rng(0), variance_noise=np.zeros(SHAPE, np.float32))


def test_registry_and_config_errors():
    assert set(SCHEDULERS) == {"ddim", "ddpm", "dpmsolver++", "euler"}
    with pytest.raises(InputError, match="'pndm'.*ddim, ddpm, dpmsolver\\+\\+, euler"):
        get_scheduler("pndm", SD15)
    with pytest.raises(InputError, match="'beta_schedule'.*'cubic'"):
        get_scheduler("ddim", dict(SD15, beta_schedule="cubic"))
    with pytest.raises(InputError, match="'use_karras_sigmas'"):
        get_scheduler("euler", dict(SD15, use_karras_sigmas=True))
    with pytest.raises(InputError, match="'algorithm_type'"):
        get_scheduler("dpmsolver++", dict(SD15, algorithm_type="sde-dpmsolver++"))
    scheduler = get_scheduler("ddim", dict(SD15, _class_name="PNDMScheduler", skip_prk_steps=True))  # ignored keys
    with pytest.raises(InputError, match="steps: got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        scheduler.step(np.zeros(SHAPE, np.float32), 1, np.zeros(SHAPE, np.float32))


def test_guidance_batches_uncond_first_and_combines():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    uncond, cond = rng.standard_normal((2, 2, 77, 16)).astype(np.float32)
    batch = batch_for_guidance(7.5, shared={"sample": latents}, paired={"encoder_hidden_states": (uncond, cond)})
    np.testing.assert_array_equal(batch["sample"], np.concatenate([latents, latents]))
    np.testing.assert_array_equal(batch["encoder_hidden_states"][:2], uncond)
    np.testing.assert_array_equal(batch["encoder_hidden_states"][2:], cond)

    out_uncond, out_cond = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    combined = combine_guidance(np.concatenate([out_uncond, out_cond]), 7.5)
    np.testing.assert_allclose(combined, out_uncond + 7.5 * (out_cond - out_uncond), rtol=1e-6)
    assert combined.dtype == np.float32

    # scale <= 1: no unconditional rows at all, output untouched
    assert not uses_guidance(1.0) and uses_guidance(1.01)
    plain = batch_for_guidance(1.0, shared={"sample": latents}, paired={"encoder_hidden_states": (uncond, cond)})
    assert plain["sample"] is latents and plain["encoder_hidden_states"] is cond
    assert combine_guidance(out_cond, 1.0) is out_cond
    with pytest.raises(InputError, match="guidance_scale"):
        uses_guidance(float("nan"))
    with pytest.raises(InputError, match="encoder_hidden_states"):
        batch_for_guidance(3.0, paired={"encoder_hidden_states": (uncond[:1], cond)})
