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
from .base import LOWER, MetricInfo, Tally
from .layout import Layout, load_layout, parse_layout
from .protocols import DEFAULT_PROTOCOL, PROTOCOLS, Fields, evaluate_layout, protocol_named

#: Every metric of the default (posterrt) protocol by report key, in table order.
METRICS: dict[str, MetricInfo] = PROTOCOLS[DEFAULT_PROTOCOL].metrics


def summarize(per_layout: Iterable[Mapping[str, Tally]], names: Iterable[str] = METRICS) -> dict[str, Tally]:
    """Tallies added over layouts: ``.value`` is each paper's set mean, ``.count`` what it averaged.
    ``names``: the metrics of the protocol that made the tallies (posterrt's by default)."""
    totals = {name: Tally(measured=False) for name in names}
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
                   masks: Sequence | None = None, protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Set means of every metric that is defined on at least one layout.

    ``layouts``: Layout objects, layout JSON objects or paths (:func:`~.batch.batch_layouts` makes
    them from a benchmark's arrays). ``images``, ``saliency``, ``masks``: one entry per layout (or
    None): a path, a PIL image or an array; a saliency entry may also be a list of maps, whose
    element-wise max is used. Images are the canvases the layouts were made for (RGB uint8 or gray),
    saliency maps 0..255 (or float 0..1 under ``posterrt``), masks white = product. ``protocol``:
    ``posterrt`` (corrected definitions), ``posterlayout`` or ``radm`` (the benchmark scripts'
    computations, quirks included; see docs/metrics.md). Under ``posterrt``, without saliency the
    stand-in comes from the mask or the layout's product boxes.
    """
    chosen = protocol_named(protocol, "protocol")
    layouts = [_as_layout(item, index) for index, item in enumerate(layouts)]
    images = _aligned(images, len(layouts), "images")
    saliency = _aligned(saliency, len(layouts), "saliency")
    masks = _aligned(masks, len(layouts), "masks")
    per_layout = []
    for index, layout in enumerate(layouts):
        maps = saliency[index]
        maps = [] if maps is None else list(maps) if isinstance(maps, (list, tuple)) else [maps]
        fields = Fields(f"images[{index}]", f"saliency[{index}]", f"masks[{index}]")
        per_layout.append(chosen.evaluate(layout, images[index], maps, masks[index], fields).tallies)
    means = chosen.set_means(summarize(per_layout, chosen.metrics))
    return {name: mean for name, mean in means.items() if mean is not None}


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
    known = {name: info for protocol in PROTOCOLS.values() for name, info in protocol.metrics.items()}
    names = [name for name in known if name in reference or name in candidate]
    unknown = sorted((set(reference) | set(candidate)) - set(known))
    if unknown:
        raise InputError(f"compare_layout_metrics: unknown metric {unknown[0]!r}, expected keys from layout_metrics "
                         f"such as {next(iter(METRICS))!r}")
    return {name: MetricDelta(reference.get(name), candidate.get(name), known[name].better) for name in names}
