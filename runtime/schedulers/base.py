"""What the numpy UNet samplers share: config resolution, beta schedules, timestep spacing.

Each sampler mirrors one diffusers scheduler (same config keys and defaults, same
``set_timesteps(n)`` / ``step(model_output, t, sample)`` shape) so that a bundle's diffusers-style
``scheduler`` config drives it unchanged and tests can compare the two step for step.

Numerics: the noise schedule (betas, ``alphas_cumprod``, sigmas) is kept in float32 exactly as
diffusers builds it, because that is the schedule SD checkpoints were trained and evaluated with.
Per-step coefficients are Python floats (double precision) applied to the float32 arrays, which
keeps the arrays float32 under both NumPy 1 and NumPy 2 casting rules.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import InputError

#: diffusers' constructor defaults shared by the four schedulers; each scheduler adds its own.
COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

COMMON_CHOICES: dict[str, tuple] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}

#: diffusers features these samplers do not implement: a config may carry them only at the value
#: that switches them off (None counts as off). Anything else is refused, never silently ignored.
COMMON_UNSUPPORTED: dict[str, Any] = {"thresholding": False, "rescale_betas_zero_snr": False}


def resolve_config(name: str, defaults: Mapping[str, Any], choices: Mapping[str, tuple],
                   unsupported: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """diffusers' defaults overridden by ``given``; keys no scheduler here reads are ignored, as
    diffusers' ``from_config`` ignores them (``_class_name``, ``skip_prk_steps``, ...)."""
    given = dict(given or {})
    for key, off in unsupported.items():
        if given.get(key) not in (None, off):
            raise InputError(f"scheduler {name!r} config {key!r}: {given[key]!r} is not supported by the "
                             f"numpy samplers; expected {off!r}")
    config = dict(defaults)
    config.update({key: value for key, value in given.items() if key in defaults})
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise InputError(f"scheduler {name!r} config {key!r}: got {config[key]!r}, expected one of "
                             f"{', '.join(map(repr, allowed))}")
    if not isinstance(config["num_train_timesteps"], int) or config["num_train_timesteps"] < 1:
        raise InputError(f"scheduler {name!r} config 'num_train_timesteps': got "
                         f"{config['num_train_timesteps']!r}, expected a positive integer")
    return config


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas of the configured schedule, built as diffusers builds them."""
    steps = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
        if betas.shape != (steps,):
            raise InputError(f"scheduler config 'trained_betas': got {betas.shape[0] if betas.ndim else 0} values, "
                             f"expected num_train_timesteps={steps}")
        return betas
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], steps).astype(np.float32)
    if schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta), squared in float32 as diffusers does.
        roots = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps).astype(np.float32)
        return roots ** 2
    if schedule == "squaredcos_cap_v2":
        return glide_cosine_betas(steps)
    raise AssertionError(f"unchecked beta_schedule {schedule!r}")


def glide_cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule as diffusers' ``betas_for_alpha_bar``: alpha_bar(t) =
    cos^2((t + 0.008) / 1.008 * pi / 2) on t = i / steps, betas capped at ``max_beta``."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta).astype(np.float32)


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                     steps_offset: int) -> np.ndarray:
    """Descending timesteps of DDIM, DDPM and Euler (Table 2 of Lin et al. 2023, as diffusers).

    ``linspace`` may give fractional values: DDIM/DDPM round them, Euler keeps them.
    """
    n, total = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, total - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (total // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)) - 1
    raise AssertionError(f"unchecked timestep_spacing {spacing!r}")


def predicted_original(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
                       alpha_prod_t: float) -> np.ndarray:
    """x0 from the model output of a VP (DDPM-family) model at cumulative alpha ``alpha_prod_t``."""
    alpha, beta = alpha_prod_t, 1.0 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta ** 0.5 * model_output) / alpha ** 0.5
    if prediction_type == "v_prediction":
        return alpha ** 0.5 * sample - beta ** 0.5 * model_output
    return model_output  # "sample": the model predicts x0 itself


class Scheduler(ABC):
    """One numpy UNet sampler. ``set_timesteps(n)``, then for each ``t`` in ``timesteps``:
    ``model_input = scale_model_input(sample, t)``, run the model, ``sample = step(out, t, sample)``.

    ``timesteps`` is a descending numpy array (int64, float32 for Euler); the UNet's ``timestep``
    input is ``np.full(batch, t, np.float32)``. Initial latents are ``standard_normal * init_noise_sigma``.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    choices: ClassVar[dict[str, tuple]] = COMMON_CHOICES
    unsupported: ClassVar[dict[str, Any]] = COMMON_UNSUPPORTED

    def __init__(self, config: Mapping[str, Any] | None = None):
        self.config = resolve_config(self.name, self.defaults, self.choices, self.unsupported, config)
        self.betas = make_betas(self.config)
        # alphas in float32, their product accumulated in double and stored as float32: what
        # torch.cumprod does on CPU for diffusers.
        alphas = np.float32(1.0) - self.betas
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        self.num_train_timesteps: int = self.config["num_train_timesteps"]
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        return sample

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps of an ``num_inference_steps``-step run and reset per-run state."""

    @abstractmethod
    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        """One denoising step: the sample at the next (lower) timestep, same dtype as ``sample``."""

    # -- helpers for subclasses --------------------------------------------------------------
    def _check_steps(self, num_inference_steps) -> int:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise InputError(f"steps: got {num_inference_steps!r}, expected an integer in "
                             f"1..{self.num_train_timesteps} (the scheduler's num_train_timesteps)")
        return int(num_inference_steps)

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.step called before set_timesteps")

    def _index_of(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; the second one if it occurs twice (diffusers'
        rule, so a run started mid-schedule does not skip a sigma)."""
        matches = np.flatnonzero(self.timesteps == timestep)
        if matches.size == 0:
            raise InputError(f"timestep: {timestep!r} is not one of this run's timesteps {self.timesteps.tolist()}")
        return int(matches[1] if matches.size > 1 else matches[0])


def variance_noise_for(shape, dtype, generator: np.random.Generator | None,
                       variance_noise: np.ndarray | None) -> np.ndarray:
    """The Gaussian noise a stochastic step adds: given explicitly, or drawn from ``generator``
    (a fresh, unseeded one when None, like diffusers without a generator)."""
    if variance_noise is not None:
        if generator is not None:
            raise InputError("step: pass either generator or variance_noise, not both")
        if variance_noise.shape != tuple(shape):
            raise InputError(f"variance_noise: got shape {variance_noise.shape}, expected {tuple(shape)}")
        return variance_noise
    generator = generator if generator is not None else np.random.default_rng()
    return generator.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
