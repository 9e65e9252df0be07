"""Which definitions a report uses, and how each reads a layout's pixels.

- ``posterrt`` (default): PosterLayout's, RADM's and LayoutGAN++'s metrics from their definitions,
  with the corrections docs/metrics.md lists (modules posterlayout, radm, layoutgan).
- ``posterlayout``: PosterLayout's ``eval.py`` as published, quirks included (posterlayout_script).
- ``radm``: RADM's ``metrics.py`` as published, quirks included (radm_script).

The script protocols report under the same keys as the posterrt protocol's family, so a table can
hold both; the report names the protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from . import layoutgan, posterlayout, posterlayout_script, radm, radm_script
from .base import MetricInfo, Tally
from .canvas import canvas_gray, map_on_canvas
from .layout import Layout
from .saliency import resolve


@dataclass(frozen=True)
class Fields:
    """How the inputs are named in error messages (CLI flags, or the API's argument names)."""
    image: str = "--images"
    saliency: str = "--saliency"
    mask: str = "--masks"


@dataclass(frozen=True)
class Evaluation:
    tallies: dict[str, Tally]
    saliency: str | None  # what the saliency came from, for the report


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    metrics: dict[str, MetricInfo]
    class_ids: Mapping[int, str]  # the default class-id map of a benchmark-style batch
    run: Callable[[Layout, object, Sequence, object, Fields], Evaluation]
    reads_masks: bool = False  # only posterrt has a saliency stand-in made from product masks

    def check_masks(self, given: bool, fields: Fields = Fields()) -> None:
        if given and not self.reads_masks:
            raise InputError(f"{fields.mask}: the {self.name} protocol has no saliency stand-in (its script reads "
                             f"saliency maps only); give {fields.saliency} or use --protocol posterrt")

    def evaluate(self, layout: Layout, image=None, saliency: Sequence = (), mask=None,
                 fields: Fields = Fields()) -> Evaluation:
        """Tallies of every metric of this protocol for one layout. ``image``: the canvas (path, PIL
        image or array); ``saliency``: the maps (their element-wise max is used); ``mask``: a product
        mask (posterrt's saliency stand-in). A metric whose input is missing is undefined."""
        self.check_masks(mask is not None, fields)
        evaluation = self.run(layout, image, list(saliency), mask, fields)
        assert evaluation.tallies.keys() == self.metrics.keys()
        return evaluation

    def set_means(self, totals: Mapping[str, Tally]) -> dict[str, float | None]:
        return {name: info.set_mean(totals[name]) for name, info in self.metrics.items()}


POSTERRT_FAMILIES = (posterlayout, radm, layoutgan)


def evaluate_layout(layout: Layout, gray: np.ndarray | None = None,
                    saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """Every posterrt-protocol metric's tally for one layout. ``gray``: canvas 0..255, ``saliency``:
    0..1, both ``[height, width]``; metrics that need a missing one come back undefined."""
    for name, array in (("gray", gray), ("saliency", saliency)):
        assert array is None or array.shape == (layout.height, layout.width), (name, array.shape)
    tallies: dict[str, Tally] = {}
    for family in POSTERRT_FAMILIES:
        tallies.update(family.evaluate(layout, gray=gray, saliency=saliency))
    return tallies


def _posterrt(layout: Layout, image, maps: list, mask, fields: Fields) -> Evaluation:
    gray = None if image is None else canvas_gray(image, layout, fields.image)
    saliency_map = maps[0] if len(maps) == 1 else None
    if len(maps) > 1:
        saliency_map = np.maximum.reduce([map_on_canvas(m, layout, fields.saliency) for m in maps])
    names = " + ".join(str(m) for m in maps if not isinstance(m, np.ndarray))
    salient = resolve(layout, saliency_map, mask, map_name=names, mask_name="" if mask is None else str(mask),
                      map_field=fields.saliency, mask_field=fields.mask)
    return Evaluation(evaluate_layout(layout, gray, salient.values), salient.source)


def _posterlayout(layout: Layout, image, maps: list, mask, fields: Fields) -> Evaluation:
    gradient = None if image is None else posterlayout_script.gradient_8bit(image, layout, fields.image)
    saliency = posterlayout_script.saliency_map(maps, layout, fields.saliency) if maps else None
    source = "max of " + " + ".join(str(m) for m in maps) if maps else None
    return Evaluation(posterlayout_script.evaluate(layout, gradient, saliency), source)


def _radm(layout: Layout, image, maps: list, mask, fields: Fields) -> Evaluation:
    gray = None if image is None else canvas_gray(image, layout, fields.image)
    return Evaluation(radm_script.evaluate(layout, gray), None)


def _metrics(*families) -> dict[str, MetricInfo]:
    return {info.name: info for family in families for info in family.METRICS}


PROTOCOLS: dict[str, Protocol] = {
    "posterrt": Protocol("posterrt", "posterrt's corrected definitions (docs/metrics.md)",
                         _metrics(*POSTERRT_FAMILIES), posterlayout_script.CLASS_IDS, _posterrt,
                         reads_masks=True),
    "posterlayout": Protocol("posterlayout", "PosterLayout-CVPR2023 eval.py, quirks included",
                             _metrics(posterlayout_script), posterlayout_script.CLASS_IDS, _posterlayout),
    "radm": Protocol("radm", "RADM metrics.py, quirks included", _metrics(radm_script), radm_script.CLASS_IDS, _radm),
}
DEFAULT_PROTOCOL = "posterrt"


def protocol_named(name: str, field: str = "--protocol") -> Protocol:
    if name not in PROTOCOLS:
        raise InputError(f"{field}: got {name!r}, expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
