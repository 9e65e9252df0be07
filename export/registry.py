"""Which family module builds which served model. Families are imported only when needed."""
from __future__ import annotations

import importlib

from posterrt.runtime.contracts import MODEL_NAMES, parse_model_list
from posterrt.runtime.errors import InputError

# family module (in posterrt.export.networks) -> the served models it builds
FAMILIES = {
    "radm": ("radm_backbone", "radm_text_encoder", "radm_head"),
    "plannet": ("plannet_encoder", "plannet_denoiser"),
    "stable_diffusion": ("clip_text_encoder", "image_encoder", "vae_encoder", "vae_decoder", "bg_unet"),
    "rendernet": ("render_condition", "render_unet"),
}
PRESETS = ("tiny", "paper")

MODEL_FAMILY = {model: family for family, models in FAMILIES.items() for model in models}
assert set(MODEL_FAMILY) == set(MODEL_NAMES), "every served model has exactly one family"


def family_module(family: str):
    return importlib.import_module(f"posterrt.export.networks.{family}")


def parse_models(text: str | None) -> list[str]:
    """``"radm_head,bg_unet"`` -> names in contract order; None means all."""
    return parse_model_list(text)


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise InputError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return preset
