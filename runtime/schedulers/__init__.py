"""numpy samplers of the torch-free runtime.

UNet samplers (diffusers-shaped, chosen by name with :func:`get_scheduler`), classifier-free
guidance batching, and the two layout samplers: RADM's box DDIM (:mod:`.radm`) and PlanNet's
absorbing-state discrete diffusion (:mod:`.plannet`).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import InputError
from .base import Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .guidance import batch_for_guidance, combine_guidance, uses_guidance
from .plannet import PlanNetSampler, PlanNetSamplerConfig, PlannedLayout
from .radm import Detections, RadmBoxSampler, RadmSamplerConfig

#: ``--scheduler`` names -> classes.
SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)
}


def get_scheduler(name: str, config: Mapping[str, Any] | None = None, **options) -> Scheduler:
    """A fresh scheduler by name, configured from a bundle's diffusers-style scheduler config.

    ``options`` go to the constructor (``eta`` for ``ddim``).
    """
    if name not in SCHEDULERS:
        raise InputError(f"scheduler: unknown name {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, **options)


__all__ = ["Scheduler", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
           "SCHEDULERS", "get_scheduler", "batch_for_guidance", "combine_guidance", "uses_guidance",
           "RadmBoxSampler", "RadmSamplerConfig", "Detections", "PlanNetSampler", "PlanNetSamplerConfig", "PlannedLayout"]
