"""DDPM ancestral sampling (Ho et al. 2020) in numpy, step for step as diffusers' ``DDPMScheduler``."""
from __future__ import annotations

import numpy as np

from .base import COMMON_CHOICES, COMMON_DEFAULTS, Scheduler, predicted_original, spaced_timesteps, \
    variance_noise_for


class DDPMScheduler(Scheduler):
    """Every step but the last adds Gaussian noise: from ``generator``, or ready-made ``variance_noise``."""

    name = "ddpm"
    defaults = {**COMMON_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0, "variance_type": "fixed_small"}
    choices = {**COMMON_CHOICES, "variance_type": ("fixed_small", "fixed_large")}

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = self._check_steps(num_inference_steps)
        self.timesteps = spaced_timesteps(self.config["timestep_spacing"], self.num_inference_steps,
                                          self.num_train_timesteps, self.config["steps_offset"]
                                          ).round().astype(np.int64)

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in this run (-1 after the last)."""
        index = self._index_of(timestep)
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: np.random.Generator | None = None, variance_noise: np.ndarray | None = None) -> np.ndarray:
        self._require_timesteps()
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta_t, beta_prev = 1.0 - alpha_t, 1.0 - alpha_prev
        current_alpha = alpha_t / alpha_prev  # the one-step alpha between prev_t and t, strided runs included
        current_beta = 1.0 - current_alpha

        x0 = predicted_original(self.config["prediction_type"], model_output, sample, alpha_t)
        if self.config["clip_sample"]:
            limit = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -limit, limit)

        # Posterior mean of q(x_{t-1} | x_t, x0), eq. (7).
        x0_coeff = alpha_prev ** 0.5 * current_beta / beta_t
        sample_coeff = current_alpha ** 0.5 * beta_prev / beta_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            if self.config["variance_type"] == "fixed_small":
                variance = max(beta_prev / beta_t * current_beta, 1e-20)  # posterior variance, beta tilde
            else:
                variance = current_beta
            noise = variance_noise_for(model_output.shape, model_output.dtype, generator, variance_noise)
            prev_sample = prev_sample + variance ** 0.5 * noise
        return prev_sample.astype(sample.dtype, copy=False)
