"""``<unet>_sampler`` (``bg_unet_sampler``, ``render_unet_sampler``): a UNet's whole denoising loop
in the server, one request per poster.

Why: a client-side loop pays a gRPC round trip and a Python-backend hop per step (~2 ms here,
benchmarks/RESULTS.md, Serving); with the loop in the server a background costs the prologue
calls, one loop call and the decode.

Inputs, one poster per row (rows run one after another): the UNet's step-invariant inputs, already
batched for guidance, with a leading row axis (``encoder_hidden_states`` [rows, cfg_batch, ...]);
the initial ``latents``; ``steps``, ``guidance``, the ``scheduler`` (an index into the settings'
``schedulers``), the feature cache's ``cache_interval`` (1 = off; the stage then also drives the
UNet's deep and shallow steps) and the PCG64 state of the row's generator, continued in the server
(rng.py), so the latents are those of the client loop.
"""
from __future__ import annotations

import numpy as np

from ..contracts import ModelContract, TensorSpec, get_contract
from ..pipelines.request import CACHE_INTERVAL_RANGE
from ..schedulers import SCHEDULERS
from .rng import RNG_WORDS, generator_state, set_generator_state

#: config parameter: how the stub calls the UNet ("in-process": its own copy; "bls": the served one)
MODEL_CALL_PARAMETER = "unet_call"
#: the UNet inputs that change every step; the others are the request's step-invariant inputs
PER_STEP_INPUTS = ("sample", "timestep")


def stage_name(unet: str) -> str:
    return f"{unet}_sampler"


def loop_contract(unet: ModelContract) -> ModelContract:
    """The stage's contract, from the UNet's resolved contract."""
    fixed = tuple(TensorSpec(spec.name, spec.dtype, ("batch", *spec.shape), spec.doc, spec.low, spec.high)
                  for spec in unet.inputs if spec.name not in PER_STEP_INPUTS)
    sample = unet.input("sample")
    latent_shape = ("batch", *sample.shape[1:])
    return ModelContract(
        stage_name(unet.name), unet.stage, unet.role,
        inputs=(
            *fixed,
            TensorSpec("latents", "float32", latent_shape, "initial latents (scaled by the scheduler's init_noise_sigma)"),
            TensorSpec("steps", "int64", ("batch",), "sampling steps", 1, 1001),
            TensorSpec("guidance", "float32", ("batch",), "classifier-free guidance scale (<= 1: none)", 0, 100),
            TensorSpec("scheduler", "int64", ("batch",), "index into the stage settings' schedulers", 0, len(SCHEDULERS)),
            TensorSpec("cache_interval", "int64", ("batch",), "feature cache: a deep step every N steps (1 = off)",
                       CACHE_INTERVAL_RANGE[0], CACHE_INTERVAL_RANGE[1] + 1),
            TensorSpec("rng_state", "int64", ("batch", RNG_WORDS), "PCG64 state of the row's generator"),
        ),
        outputs=(
            TensorSpec("denoised", "float32", latent_shape, "latents after the last step"),
            TensorSpec("final_rng_state", "int64", ("batch", RNG_WORDS), "each generator's state after the loop"),
        ),
        doc=f"{unet.name}'s whole sampling loop in the server: one request per poster instead of one per step.",
    )


def contract_for(unet: str):
    return lambda bundle: loop_contract(get_contract(unet).resolve(bundle.models[unet].static_dims))


def settings_for(family):
    """The family's scheduler settings and the scheduler names the ``scheduler`` input indexes."""
    # the interval range marks stages that take ``cache_interval`` (a client never sends it to an older one)
    return lambda bundle: {"scheduler_config": bundle.config[family.config_key].get("scheduler", {}),
                           "schedulers": list(SCHEDULERS), "cache_intervals": list(CACHE_INTERVAL_RANGE)}


def encode(contract: ModelContract, scheduler, latents: np.ndarray, steps: int, guidance: float, step_invariant: dict,
           rng: np.random.Generator, interval: int = 1):
    """``pipelines.diffusion.denoise``'s arguments -> the request, and the decoding of its answer
    (the latents; ``rng`` left where the server's loop left it)."""
    scheduler.set_timesteps(steps)  # a bad step count fails here, as in the client loop
    one = lambda value, dtype: np.array([value], dtype=dtype)  # noqa: E731
    inputs = {**{name: np.asarray(array)[None] for name, array in step_invariant.items()},
              "latents": np.asarray(latents, dtype=np.float32), "steps": one(steps, np.int64),
              "guidance": one(guidance, np.float32), "scheduler": one(list(SCHEDULERS).index(scheduler.name), np.int64),
              "cache_interval": one(interval, np.int64),
              "rng_state": generator_state(rng)[None]}

    def decode(outputs: dict) -> np.ndarray:
        set_generator_state(rng, outputs["final_rng_state"][0])
        return outputs["denoised"]

    return inputs, decode
