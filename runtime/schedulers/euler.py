"""Euler (Karras et al. 2022, Algorithm 2 without churn) in numpy, step for step as diffusers'
``EulerDiscreteScheduler``.

Euler works in the variance-exploding parametrization x = x0 + sigma * eps with
sigma = sqrt((1 - alpha_bar) / alpha_bar): the initial noise is scaled by ``init_noise_sigma`` and
the UNet (trained on VP inputs) sees ``scale_model_input(x, t) = x / sqrt(sigma^2 + 1)``.
"""
from __future__ import annotations

import numpy as np

from .base import COMMON_CHOICES, COMMON_DEFAULTS, COMMON_UNSUPPORTED, Scheduler, spaced_timesteps


class EulerDiscreteScheduler(Scheduler):
    name = "euler"
    defaults = {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                "timestep_type": "discrete", "final_sigmas_type": "zero"}
    choices = {**COMMON_CHOICES, "interpolation_type": ("linear",), "timestep_type": ("discrete",),
               "final_sigmas_type": ("zero", "sigma_min")}
    unsupported = {**COMMON_UNSUPPORTED, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False}

    def __init__(self, config=None):
        super().__init__(config)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, by t
        self.sigmas = np.append(self.train_sigmas[::-1], np.float32(0))
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        total = self.num_train_timesteps
        if self.config["timestep_spacing"] == "linspace":
            # Fractional timesteps on purpose: sigmas are interpolated between training steps.
            timesteps = np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
        else:
            timesteps = spaced_timesteps(self.config["timestep_spacing"], n, total,
                                         self.config["steps_offset"]).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(total), self.train_sigmas)
        sigma_last = float(self.train_sigmas[0]) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, sigma_last).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = n
        self.step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        if self.step_index is None:
            self.step_index = self._index_of(timestep)
        sigma = float(self.sigmas[self.step_index])
        return sample / (sigma ** 2 + 1) ** 0.5

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        """Deterministic (no churn): ``generator`` is accepted for a uniform interface and not used."""
        self._require_timesteps()
        if self.step_index is None:
            self.step_index = self._index_of(timestep)
        sample32 = sample.astype(np.float32, copy=False)
        sigma = float(self.sigmas[self.step_index])
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            x0 = sample32 - sigma * model_output
        elif prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample32 / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (sample32 - x0) / sigma  # dx/dsigma of the probability-flow ODE
        dt = float(self.sigmas[self.step_index + 1]) - sigma
        self.step_index += 1
        return (sample32 + derivative * dt).astype(model_output.dtype, copy=False)
