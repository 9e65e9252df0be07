"""Which family module builds which served model. Families are imported only when needed."""
from __future__ import annotations

import importlib

from posterrt.runtime import families
from posterrt.runtime.contracts import MODEL_NAMES, parse_model_list
from posterrt.runtime.errors import InputError

#: family module (in posterrt.export.networks) -> the served models it builds (runtime/families.py)
FAMILIES = {name: family.models for name, family in families.FAMILIES.items()}
MODEL_FAMILY = families.MODEL_FAMILY
PRESETS = ("tiny", "paper")


#: shallow step -> the deep step whose weights file it reads (the two graphs of one UNet share it on disk)
WEIGHTS_FROM = {family.cached_steps[1]: family.cached_steps[0] for family in families.FAMILIES.values()
                if family.cached_steps}


def with_weight_sharers(models: list[str]) -> list[str]:
    """``models`` plus the graphs that share a weights file with one of them: re-exporting one of two
    graphs alone would rewrite (or miss) the file the other reads, so they are exported together."""
    wanted = set(models)
    for shallow, deep in WEIGHTS_FROM.items():
        if shallow in wanted or deep in wanted:
            wanted |= {shallow, deep}
    return [m for m in MODEL_NAMES if m in wanted]


def family_module(family: str):
    return importlib.import_module(f"posterrt.export.networks.{family}")


def parse_models(text: str | None) -> list[str]:
    """``"radm_head,bg_unet"`` -> names in contract order; None means all."""
    return parse_model_list(text)


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise InputError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return preset
