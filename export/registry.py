"""Which family module builds which served model. Families are imported only when needed."""
from __future__ import annotations

import importlib

from posterrt.runtime import families
from posterrt.runtime.contracts import parse_model_list
from posterrt.runtime.errors import InputError

#: family module (in posterrt.export.networks) -> the served models it builds (runtime/families.py)
FAMILIES = {name: family.models for name, family in families.FAMILIES.items()}
MODEL_FAMILY = families.MODEL_FAMILY
PRESETS = ("tiny", "paper")


def family_module(family: str):
    return importlib.import_module(f"posterrt.export.networks.{family}")


def parse_models(text: str | None) -> list[str]:
    """``"radm_head,bg_unet"`` -> names in contract order; None means all."""
    return parse_model_list(text)


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise InputError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return preset
