"""DDIM (Song et al. 2021) in numpy, step for step as diffusers' ``DDIMScheduler``."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import COMMON_DEFAULTS, Scheduler, predicted_original, spaced_timesteps, variance_noise_for


class DDIMScheduler(Scheduler):
    """``eta`` = 0 is deterministic DDIM, 1 the DDPM-like stochastic sampler; set it here or per step.

    Stochastic steps (eta > 0) draw their noise from the ``generator`` passed to :meth:`step`, or
    take it ready-made as ``variance_noise``.
    """

    name = "ddim"
    defaults = {**COMMON_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}

    def __init__(self, config: Mapping[str, Any] | None = None, eta: float = 0.0):
        super().__init__(config)
        self.eta = float(eta)
        # The alpha "before" step 0: 1 (a clean image) or, as SD 1.x is configured, alpha at t=0.
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = self._check_steps(num_inference_steps)
        self.timesteps = spaced_timesteps(self.config["timestep_spacing"], self.num_inference_steps,
                                          self.num_train_timesteps, self.config["steps_offset"]
                                          ).round().astype(np.int64)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: np.random.Generator | None = None, eta: float | None = None,
             variance_noise: np.ndarray | None = None, use_clipped_model_output: bool = False) -> np.ndarray:
        self._require_timesteps()
        eta = self.eta if eta is None else float(eta)
        t = int(timestep)
        # diffusers steps back by num_train // num_inference whatever the spacing; kept for parity.
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1.0 - alpha_t

        x0 = predicted_original(self.config["prediction_type"], model_output, sample, alpha_t)
        epsilon = _epsilon(self.config["prediction_type"], model_output, sample, x0, alpha_t)
        if self.config["clip_sample"]:
            limit = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -limit, limit)
            if use_clipped_model_output:
                epsilon = (sample - alpha_t ** 0.5 * x0) / beta_t ** 0.5

        # sigma_t of eq. (16): eta scales the DDPM posterior standard deviation.
        variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
        std = eta * variance ** 0.5
        prev_sample = alpha_prev ** 0.5 * x0 + (1.0 - alpha_prev - std ** 2) ** 0.5 * epsilon
        if eta > 0:
            noise = variance_noise_for(model_output.shape, model_output.dtype, generator, variance_noise)
            prev_sample = prev_sample + std * noise
        return prev_sample.astype(sample.dtype, copy=False)


def _epsilon(prediction_type, model_output, sample, x0, alpha_t):
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t ** 0.5 * model_output + (1.0 - alpha_t) ** 0.5 * sample
    return (sample - alpha_t ** 0.5 * x0) / (1.0 - alpha_t) ** 0.5
