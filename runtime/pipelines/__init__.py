"""Pipelines: one module each, all driven through a backend (embedded ONNX Runtime or Triton).

* ``layout``: RADM on a given background (the product image is the background);
* ``background``: the background generator around the product;
* ``render``: PlanNet plans the layout, RenderNet renders the poster image;
* ``poster``: background, then RADM on it, then composition (the default).
"""
from __future__ import annotations

from importlib import import_module

#: name -> (module, class). Imported on use so that building one pipeline loads only its module.
PIPELINES = {
    "poster": ("posterrt.runtime.pipelines.poster", "PosterPipeline"),
    "layout": ("posterrt.runtime.pipelines.layout", "LayoutPipeline"),
    "background": ("posterrt.runtime.pipelines.background", "BackgroundPipeline"),
    "render": ("posterrt.runtime.pipelines.render", "RenderPipeline"),
}

#: Pipelines that paint around the product need its cutout (alpha channel or --mask).
NEEDS_PRODUCT_MASK = {"poster": True, "layout": False, "background": True, "render": True}


def needs_product_mask(name: str) -> bool:
    return NEEDS_PRODUCT_MASK[name]


def build_pipeline(name: str, backend, progress: bool = True):
    from ..errors import InputError

    if name not in PIPELINES:
        raise InputError(f"--pipeline: got {name!r}, expected one of {', '.join(PIPELINES)}")
    module, cls = PIPELINES[name]
    return getattr(import_module(module), cls)(backend, progress=progress)
