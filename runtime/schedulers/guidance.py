"""Classifier-free guidance as one batched model call (Ho & Salimans 2022).

With guidance the UNet runs on a batch of 2B rows: the B unconditional rows first, then the B
conditional ones (diffusers' order), and the two halves of its output are mixed as
``uncond + scale * (cond - uncond)``. A scale <= 1 means no guidance: nothing is doubled, only the
conditional rows run, and the output is used as is.

Typical use::

    step_invariant = batch_for_guidance(scale, paired={"encoder_hidden_states": (uncond_emb, cond_emb)},
                                        shared={"masked_image_latents": masked, "mask": mask})
    for t in scheduler.timesteps:                     # only what changes per step is doubled per step
        per_step = batch_for_guidance(scale, shared={"sample": scheduler.scale_model_input(latents, t)})
        noise = combine_guidance(unet({**step_invariant, **per_step, "timestep": ...}), scale)
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

import numpy as np

from ..errors import InputError


def uses_guidance(guidance_scale: float) -> bool:
    """Whether ``guidance_scale`` needs the unconditional rows (diffusers: scale > 1)."""
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise InputError(f"guidance_scale: got {guidance_scale!r}, expected a finite number")
    return guidance_scale > 1.0


def batch_for_guidance(guidance_scale: float, shared: Mapping[str, np.ndarray] | None = None,
                       paired: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Model inputs for one guided call.

    ``shared``: arrays identical for both halves (latents, masks, timesteps): repeated ``[x; x]``.
    ``paired``: ``(uncond, cond)`` pairs (text embeddings): concatenated ``[uncond; cond]``.
    Without guidance, shared arrays pass through and each pair contributes its ``cond`` only.
    """
    guided = uses_guidance(guidance_scale)
    batch = {}
    for name, array in (shared or {}).items():
        batch[name] = np.concatenate([array, array]) if guided else array
    for name, pair in (paired or {}).items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"{name}: expected an (uncond, cond) pair of arrays, got {type(pair).__name__}")
        uncond, cond = pair
        if guided and uncond.shape != cond.shape:
            raise InputError(f"{name}: unconditional shape {uncond.shape} differs from conditional {cond.shape}")
        batch[name] = np.concatenate([uncond, cond]) if guided else cond
    return batch


def combine_guidance(model_output: np.ndarray, guidance_scale: float) -> np.ndarray:
    """Mix the ``[uncond; cond]`` halves of a guided call's output; unguided output passes through."""
    if not uses_guidance(guidance_scale):
        return model_output
    if model_output.shape[0] % 2:
        raise InputError(f"model output: a guided batch has an even number of rows, got shape {model_output.shape}")
    uncond, cond = np.split(model_output, 2)
    return uncond + guidance_scale * (cond - uncond)
