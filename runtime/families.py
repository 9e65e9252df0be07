"""Network families: the one table of which served models each family exports, where its settings
live in a bundle and which pipeline stage runs it.

Export's registry (which module builds a model), the quality gates (a UNet's scheduler settings),
the pipelines (the models they require), the accuracy report and the Triton repository (the
settings a server stage needs) all derive their lists from here; none writes a model list again.

Adding a family: one entry below, plus its export module ``export/networks/<name>.py`` (see
docs/design.md, "Adding a network family").
"""
from __future__ import annotations

from dataclasses import dataclass

from .contracts import MODEL_NAMES

#: how a family's loop samples: a diffusers-style scheduler over latents (settings under the
#: config's ``scheduler``), RADM's box sampler, PlanNet's discrete sampler
SAMPLERS = ("unet", "radm", "plannet")


@dataclass(frozen=True)
class Family:
    name: str  # also the export module: posterrt/export/networks/<name>.py
    stage: str  # the pipeline stage that runs it (the progress and timing name: layout, plan, background, render)
    models: tuple[str, ...]  # the served models the family exports
    denoiser: str  # the model its sampling loop calls once per step
    sampler: str  # one of SAMPLERS
    borrows: tuple[str, ...] = ()  # other families' models its stage calls too (RenderNet: CLIP and the VAE decoder)
    config_key: str = ""  # its settings: bundle.config[config_key] (default: the family's name)
    #: (deep step, shallow step): the denoiser's two feature-cache graphs (DeepCache), among ``models``;
    #: the stage calls them only for a request with a cache interval above 1
    cached_steps: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.config_key:
            object.__setattr__(self, "config_key", self.name)
        assert self.denoiser in self.models and self.sampler in SAMPLERS, self
        assert not self.cached_steps or (len(self.cached_steps) == 2 and set(self.cached_steps) <= set(self.models)), self

    @property
    def stage_models(self) -> tuple[str, ...]:
        """Every served model its pipeline stage needs (its own first); the cached steps are optional."""
        return tuple(m for m in self.models if m not in self.cached_steps) + self.borrows


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("radm", "layout", ("radm_backbone", "radm_text_encoder", "radm_head"), "radm_head", "radm"),
    Family("plannet", "plan", ("plannet_encoder", "plannet_denoiser"), "plannet_denoiser", "plannet"),
    Family("stable_diffusion", "background",
           ("clip_text_encoder", "image_encoder", "vae_encoder", "vae_decoder", "bg_unet", "bg_unet_deep",
            "bg_unet_shallow"), "bg_unet", "unet", cached_steps=("bg_unet_deep", "bg_unet_shallow")),
    Family("rendernet", "render", ("render_condition", "render_unet", "render_unet_deep", "render_unet_shallow"),
           "render_unet", "unet", borrows=("clip_text_encoder", "vae_decoder"),
           cached_steps=("render_unet_deep", "render_unet_shallow")),
)}

#: served model -> its family's name
MODEL_FAMILY: dict[str, str] = {model: family.name for family in FAMILIES.values() for model in family.models}
assert set(MODEL_FAMILY) == set(MODEL_NAMES) and len(MODEL_FAMILY) == sum(len(f.models) for f in FAMILIES.values()), \
    "every served model has exactly one family"


def family_of(model: str) -> Family:
    return FAMILIES[MODEL_FAMILY[model]]


def unet_families() -> dict[str, Family]:
    """UNet (the denoiser of a ``unet`` family) -> its family, whose ``scheduler`` settings it samples with."""
    return {family.denoiser: family for family in FAMILIES.values() if family.sampler == "unet"}


def cached_steps(unet: str) -> tuple[str, str]:
    """A UNet's (deep step, shallow step) for the feature cache."""
    family = unet_families()[unet]
    assert family.cached_steps, f"{unet} has no cached steps"
    return family.cached_steps


def cached_step_of(model: str) -> str | None:
    """The UNet whose cached step (deep or shallow) ``model`` is; None for every other model."""
    return next((family.denoiser for family in FAMILIES.values() if model in family.cached_steps), None)
