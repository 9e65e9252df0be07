"""Stable Diffusion machinery shared by the background and render pipelines: the prompt encoder,
the latent denoising loop (the only per-step work) and the VAE decode.

Randomness: every stage draws from its own generator seeded by ``(seed, stage)``, so the same
request gives the same output and changing one stage's step count leaves the others' noise alone.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np

from ..backends.base import Backend
from ..errors import BundleError
from ..families import FAMILIES, cached_steps, family_of
from ..progress import current
from ..schedulers import batch_for_guidance, combine_guidance
from ..text import encode_prompt, load_tokenizer


def stage_rng(seed: int, stage: str) -> np.random.Generator:
    """A generator per (seed, stage): stable across runs and platforms (PCG64 on a fixed seed sequence)."""
    return np.random.default_rng([int(seed), zlib.crc32(stage.encode())])


def family_config(backend: Backend, family: str) -> dict:
    """The settings of ``family`` (a name in runtime/families.py) in the backend's bundle."""
    config = backend.bundle.config.get(FAMILIES[family].config_key)
    if config is None:
        raise BundleError(f"bundle {backend.bundle.root}: the manifest has no config for {family!r}; export its models "
                          f"into this bundle")
    return config


class PromptEncoder:
    """CLIP prompt -> ``encoder_hidden_states`` for the UNets (prologue: once per request).

    The prompt is the family's template with the product category (and the default style words)
    filled in; the unconditional prompt for guidance is the family's negative prompt (empty, as
    in diffusers).
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        config = family_config(backend, "stable_diffusion")
        length = backend.contract("clip_text_encoder").input("input_ids").shape[1]
        self.template = config["prompt_template"]
        self.style_words = config.get("default_style", "")
        self.negative_prompt = config.get("negative_prompt", "")
        self.tokenizer = load_tokenizer(backend.bundle, "clip_tokenizer", length, pad_id=config.get("pad_token_id"))

    def __call__(self, category: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"encoder_hidden_states": (uncond, cond), "category_token_mask": (uncond, cond)}``, each [1, ...]."""
        fields = {"category": category, "style": self.style_words}
        cond_ids, category_marks = encode_prompt(self.tokenizer, self.template, fields, marked="category")
        uncond_ids, _ = encode_prompt(self.tokenizer, self.negative_prompt, {})
        ids = np.stack([uncond_ids, cond_ids])
        hidden = self.backend.run("clip_text_encoder", {"input_ids": ids})["text_embeddings"]
        marks = category_marks[None]
        return {"encoder_hidden_states": (hidden[:1], hidden[1:]),
                "category_token_mask": (np.zeros_like(marks), marks)}


#: Independent prologue calls of one request run side by side: against a Triton server each costs
#: a round trip (~1.5 ms on 127.0.0.1) that need not add up, and in-process they overlap on the
#: cores one call leaves idle. Shared by all requests of the process (model calls release the GIL).
_PROLOGUE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="posterrt-prologue")


def run_side_by_side(*calls: Callable[[], object]) -> list:
    """The results of ``calls`` (argument-free callables), the first run in this thread and the others
    on the prologue pool; an exception of any call is raised here."""
    futures = [_PROLOGUE.submit(call) for call in calls[1:]]
    first = calls[0]()
    return [first, *(future.result() for future in futures)]


def initial_latents(shape: tuple[int, ...], scheduler, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scheduler.init_noise_sigma)).astype(np.float32)


def cache_interval(config: dict, requested: int | None) -> int:
    """The request's feature-cache interval, else the family's gated default (1: no caching)."""
    return int(requested or config.get("cache_interval", 1))


def require_cached_steps(backend: Backend, model: str, interval: int) -> tuple[str, str]:
    """``model``'s (deep, shallow) steps; BundleError when ``interval`` > 1 needs them and the bundle lacks them."""
    deep, shallow = cached_steps(model)
    missing = [m for m in (deep, shallow) if m not in backend.bundle.models]
    if interval > 1 and missing:
        raise BundleError(f"cache_interval {interval}: bundle {backend.bundle.root} lacks {missing}, the cached "
                          f"steps of {model}; export them (`posterrt export --models {deep},{shallow}`) or use "
                          f"cache_interval 1")
    return deep, shallow


class UNetSteps:
    """The UNet's call at step ``index`` -> noise prediction, with DeepCache's feature cache when
    ``interval`` > 1: every ``interval``-th step (from the first) runs the deep step, the full UNet,
    and keeps its deep feature; the steps between run the shallow step on that feature (the UNet
    family's ``cached_steps``). The step-invariant inputs are bound (checked) once, here."""

    def __init__(self, backend: Backend, model: str, step_invariant: Mapping[str, np.ndarray], interval: int = 1):
        self.interval = interval
        self.feature = None
        if interval == 1:
            self.full = backend.bind(model, step_invariant)
            return
        deep, shallow = require_cached_steps(backend, model, interval)
        self.deep, self.shallow = backend.bind(deep, step_invariant), backend.bind(shallow, step_invariant)

    def __call__(self, index: int, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.interval == 1:
            return self.full(inputs)["noise_pred"]
        if index % self.interval == 0:
            outputs = self.deep(inputs)
            self.feature = outputs["deep_feature"]
            return outputs["noise_pred"]
        return self.shallow({**inputs, "deep_feature": self.feature})["noise_pred"]


def denoise(backend: Backend, model: str, scheduler, latents: np.ndarray, steps: int, guidance: float,
            step_invariant: Mapping[str, np.ndarray], rng: np.random.Generator, server_loop=None,
            interval: int = 1) -> np.ndarray:
    """The sampling loop: per step, only the noisy latents and the timestep change.

    ``step_invariant`` holds the UNet's other inputs, already batched for guidance by the caller
    (outside this loop): text embeddings, masked-image latents, control embedding, scales.
    ``server_loop`` (the backend's ``server_stage`` for this UNet): run this same loop in the server
    instead, one request, continuing ``rng`` there. ``interval``: the feature cache's (:class:`UNetSteps`).
    """
    if server_loop is not None:
        require_cached_steps(backend, model, interval)  # the server's stage drives what this bundle has
        return server_loop(scheduler, latents, steps, guidance, step_invariant, rng, interval=interval)
    scheduler.set_timesteps(steps)
    unet = UNetSteps(backend, model, step_invariant, interval)
    control, stage, timesteps = current(), family_of(model).stage, scheduler.timesteps
    for index, t in enumerate(timesteps):
        per_step = batch_for_guidance(guidance, shared={"sample": scheduler.scale_model_input(latents, t)})
        batch = per_step["sample"].shape[0]
        noise = unet(index, {**per_step, "timestep": np.full(batch, t, dtype=np.float32)})
        latents = scheduler.step(combine_guidance(noise, guidance), t, latents, generator=rng)
        control.step(stage, index + 1, len(timesteps))  # progress; a cancelled or late request stops here
    return latents


def decode(backend: Backend, latents: np.ndarray) -> np.ndarray:
    """VAE decode (epilogue) to RGB uint8 HxWx3; the graph already maps to 0..1."""
    image = backend.run("vae_decoder", {"latent": latents.astype(np.float32)})["image"][0]
    return to_uint8(image.transpose(1, 2, 0))


def to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image01 * 255.0), 0, 255).astype(np.uint8)


def to_chw(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 [1, 3, H, W] scaled to low..high (the contract's value range)."""
    scaled = rgb.astype(np.float32) / np.float32(255.0) * np.float32(high - low) + np.float32(low)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1)[None])
