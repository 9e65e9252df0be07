"""All layout metrics together: per layout, over a set, and reference-versus-candidate.

``layout_metrics`` and ``compare_layout_metrics`` are what an accuracy report calls (for example an
fp16 TensorRT RADM against its fp32 ONNX export); ``posterrt eval-layout`` uses the same functions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from . import layoutgan, posterlayout, radm
from .base import LOWER, MetricInfo, Tally
from .canvas import canvas_gray
from .layout import Layout, load_layout, parse_layout
from .saliency import resolve

FAMILIES = (posterlayout, radm, layoutgan)
#: Every metric by report key, in table order.
METRICS: dict[str, MetricInfo] = {info.name: info for family in FAMILIES for info in family.METRICS}


def evaluate_layout(layout: Layout, gray: np.ndarray | None = None,
                    saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """Every metric's tally for one layout. ``gray``: canvas 0..255, ``saliency``: 0..1, both
    ``[height, width]``; metrics that need a missing one come back undefined."""
    for name, array in (("gray", gray), ("saliency", saliency)):
        assert array is None or array.shape == (layout.height, layout.width), (name, array.shape)
    tallies: dict[str, Tally] = {}
    for family in FAMILIES:
        tallies.update(family.evaluate(layout, gray=gray, saliency=saliency))
    assert tallies.keys() == METRICS.keys()
    return tallies


def summarize(per_layout: Iterable[Mapping[str, Tally]]) -> dict[str, Tally]:
    """Tallies added over layouts: ``.value`` is each paper's set mean, ``.count`` what it averaged."""
    totals = {name: Tally() for name in METRICS}
    for tallies in per_layout:
        for name, tally in tallies.items():
            totals[name] = totals[name] + tally
    return totals


def _as_layout(item, index: int) -> Layout:
    if isinstance(item, Layout):
        return item
    if isinstance(item, Mapping):
        return parse_layout(item, f"layouts[{index}]")
    if isinstance(item, (str, os.PathLike)):
        return load_layout(item)
    raise InputError(f"layouts[{index}]: got {type(item).__name__}, expected a Layout, a layout JSON object or a path")


def _aligned(values: Sequence | None, count: int, name: str) -> list:
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise InputError(f"{name}: got {len(values)} entries, expected one per layout ({count})")
    return values


def layout_metrics(layouts: Sequence, images: Sequence | None = None, saliency: Sequence | None = None,
                   masks: Sequence | None = None) -> dict[str, float]:
    """Set means of every metric that is defined on at least one layout.

    ``layouts``: Layout objects, layout JSON objects or paths. ``images``, ``saliency``, ``masks``:
    one entry per layout (or None): a path, a PIL image or an array. Images are the canvases the
    layouts were made for (RGB uint8 or gray), saliency maps 0..255 (or float 0..1), masks white =
    product. Without saliency, the stand-in comes from the mask or the layout's product boxes.
    """
    layouts = [_as_layout(item, index) for index, item in enumerate(layouts)]
    images = _aligned(images, len(layouts), "images")
    saliency = _aligned(saliency, len(layouts), "saliency")
    masks = _aligned(masks, len(layouts), "masks")
    per_layout = []
    for index, layout in enumerate(layouts):
        gray = None if images[index] is None else canvas_gray(images[index], layout, f"images[{index}]")
        salient = resolve(layout, saliency[index], masks[index],
                          map_field=f"saliency[{index}]", mask_field=f"masks[{index}]")
        per_layout.append(evaluate_layout(layout, gray, salient.values))
    return {name: tally.value for name, tally in summarize(per_layout).items() if tally.value is not None}


@dataclass(frozen=True)
class MetricDelta:
    """One metric, reference against candidate. ``delta`` = candidate - reference (None if either
    is missing); ``worse`` says whether the candidate moved in the metric's bad direction."""

    reference: float | None
    candidate: float | None
    better: str

    @property
    def delta(self) -> float | None:
        if self.reference is None or self.candidate is None:
            return None
        return self.candidate - self.reference

    @property
    def worse(self) -> bool:
        delta = self.delta
        if delta is None:
            return False
        return delta > 0 if self.better == LOWER else delta < 0

    def as_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "delta": self.delta,
                "better": self.better, "worse": self.worse}


def compare_layout_metrics(reference: Mapping[str, float], candidate: Mapping[str, float]) -> dict[str, MetricDelta]:
    """Per metric present in either set of means (from :func:`layout_metrics`), the change from
    ``reference`` to ``candidate`` and whether it is for the worse."""
    names = [name for name in METRICS if name in reference or name in candidate]
    unknown = sorted((set(reference) | set(candidate)) - set(METRICS))
    if unknown:
        raise InputError(f"compare_layout_metrics: unknown metric {unknown[0]!r}, expected keys from layout_metrics "
                         f"such as {next(iter(METRICS))!r}")
    return {name: MetricDelta(reference.get(name), candidate.get(name), METRICS[name].better) for name in names}
