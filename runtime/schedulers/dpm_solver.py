"""DPM-Solver++ 2M (Lu et al. 2022) in numpy, step for step as diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``.

The solver integrates the data-prediction ODE in log-SNR time lambda = log(alpha / sigma); the
multistep second-order update reuses the previous step's x0 prediction, so each step costs one
model call. Only the deterministic ``dpmsolver++`` algorithm with orders 1 and 2 is implemented.
"""
from __future__ import annotations

import math

import numpy as np

from .base import COMMON_CHOICES, COMMON_DEFAULTS, COMMON_UNSUPPORTED, Scheduler, predicted_original


class DPMSolverMultistepScheduler(Scheduler):
    name = "dpmsolver++"
    defaults = {
        **COMMON_DEFAULTS,
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
    }
    choices = {
        **COMMON_CHOICES,
        "solver_order": (1, 2),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None,),
    }
    unsupported = {**COMMON_UNSUPPORTED, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                   "use_dynamic_shifting": False}

    def __init__(self, config=None):
        super().__init__(config)
        # VP schedule: x_t = alpha_t x0 + sigma_t eps; lambda_t clipping as diffusers (cosine schedules).
        alpha = np.sqrt(self.alphas_cumprod)
        sigma = np.sqrt(1 - self.alphas_cumprod)
        self.lambdas = np.log(alpha) - np.log(sigma)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # sigma/alpha, float32
        self.sigmas: np.ndarray | None = None  # per run, from set_timesteps
        self._reset()

    def _reset(self):
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0
        self.step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        total = self.num_train_timesteps
        clipped = int(np.searchsorted(self.lambdas[::-1], self.config["lambda_min_clipped"]))
        last = total - clipped
        spacing = self.config["timestep_spacing"]
        # n + 1 points with the final 0 dropped: the run ends at sigma_last, not at t=0.
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.config["steps_offset"]
        else:  # trailing
            timesteps = np.arange(last, 0, -total / n).round() - 1
        self.timesteps = timesteps.astype(np.int64)

        sigmas = np.interp(self.timesteps, np.arange(total), self.train_sigmas)
        if self.config["final_sigmas_type"] == "sigma_min":
            sigma_last = float(self.train_sigmas[0])
        else:
            sigma_last = 0.0  # the last step returns the x0 prediction itself
        self.sigmas = np.append(sigmas, sigma_last).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        """Deterministic: ``generator`` is accepted for a uniform interface and not used."""
        self._require_timesteps()
        if self.step_index is None:
            self.step_index = self._index_of(timestep)
        last_step = self.step_index == len(self.timesteps) - 1
        # First-order final step: more stable for short runs, and required when the final sigma is 0.
        lower_order_final = last_step and (
            self.config["euler_at_final"]
            or (self.config["lower_order_final"] and len(self.timesteps) < 15)
            or self.config["final_sigmas_type"] == "zero")

        x0 = self._data_prediction(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample32 = sample.astype(np.float32, copy=False)
        if self.config["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order_update(x0, sample32)
        else:
            prev_sample = self._second_order_update(self.model_outputs[-1], self.model_outputs[-2], sample32)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config["solver_order"])
        self.step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False)

    # -- the solver ------------------------------------------------------------------------------
    def _alpha_sigma(self, index: int) -> tuple[float, float]:
        """VP (alpha_t, sigma_t) of step ``index`` from its sigma/alpha ratio."""
        ratio = float(self.sigmas[index])
        alpha = 1.0 / (ratio ** 2 + 1.0) ** 0.5
        return alpha, ratio * alpha

    def _lambda(self, index: int) -> float:
        alpha, sigma = self._alpha_sigma(index)
        return math.log(alpha) - math.log(sigma) if sigma > 0 else math.inf

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(self.step_index)
        return predicted_original(self.config["prediction_type"], model_output, sample, alpha ** 2)

    def _first_order_update(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++(1), i.e. DDIM in lambda time: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) x0."""
        s, t = self.step_index, self.step_index + 1
        alpha_t, sigma_t = self._alpha_sigma(t)
        _, sigma_s = self._alpha_sigma(s)
        exp_neg_h = math.exp(-(self._lambda(t) - self._lambda(s)))  # 0 when sigma_t is 0
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp_neg_h - 1.0)) * x0

    def _second_order_update(self, m0: np.ndarray, m1: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Multistep DPM-Solver++(2M): a finite-difference slope D1 from the last two x0 predictions."""
        s0, s1, t = self.step_index, self.step_index - 1, self.step_index + 1
        alpha_t, sigma_t = self._alpha_sigma(t)
        _, sigma_s0 = self._alpha_sigma(s0)
        lambda_t, lambda_s0, lambda_s1 = self._lambda(t), self._lambda(s0), self._lambda(s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        phi = math.expm1(-h)  # e^-h - 1
        if self.config["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0) * sample - (alpha_t * phi) * d0 - (0.5 * alpha_t * phi) * d1
        return (sigma_t / sigma_s0) * sample - (alpha_t * phi) * d0 + (alpha_t * (phi / h + 1.0)) * d1
