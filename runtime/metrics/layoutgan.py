"""Content-agnostic overlap and alignment as LayoutGAN++ defines them (Kikuchi et al., ACM MM 2021,
"Constrained Graphic Layout Generation via Latent Optimization"), after Attribute-conditioned
LayoutGAN. They ignore the image and the element classes; both are averaged per layout.
"""
from __future__ import annotations

import numpy as np

from .base import LOWER, UNDEFINED, MetricInfo, Tally
from .geometry import alignment_gaps, areas, intersections, safe_ratio
from .layout import Layout

FAMILY = "layoutgan"
MAX_GAP = 1.0 - 1e-6  # keeps -ln(1 - gap) finite for boxes outside the canvas

METRICS = (
    MetricInfo(f"{FAMILY}.overlap", LOWER, "[0, n-1]", "boxes", "layouts",
               "sum over ordered pairs of |Si ∩ Sj| / |Si|, divided by the number of elements"),
    MetricInfo(f"{FAMILY}.alignment", LOWER, "[0, 13.8]", "boxes", "layouts",
               "mean over elements of -ln(1 - smallest anchor gap to another element)"),
)


def overlap(layout: Layout) -> Tally:
    """(1/n) sum over i != j of |S_i ∩ S_j| / |S_i| over all n elements (a zero-area S_i adds 0).
    Undefined for an empty layout."""
    boxes = layout.boxes[layout.graphic]
    if len(boxes) == 0:
        return UNDEFINED
    ratios = safe_ratio(intersections(boxes, boxes), areas(boxes)[:, None])
    np.fill_diagonal(ratios, 0.0)
    return Tally.mean_of_one(ratios.sum() / len(boxes))


def alignment(layout: Layout) -> Tally:
    """(1/n) sum over elements of -ln(1 - d_i), d_i the smallest gap between one of the element's six
    anchors (left, centre, right / top, middle, bottom, normalized by the canvas) and the same anchor
    of another element. A lone element is aligned (0); undefined for an empty layout."""
    boxes = layout.boxes[layout.graphic]
    if len(boxes) == 0:
        return UNDEFINED
    if len(boxes) == 1:
        return Tally.mean_of_one(0.0)
    gaps = np.clip(alignment_gaps(boxes, layout.width, layout.height), 0.0, MAX_GAP)
    return Tally.mean_of_one(float(-np.log(1.0 - gaps).mean()))


def evaluate(layout: Layout, gray: np.ndarray | None = None, saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """Both metrics of one layout (content-agnostic: ``gray`` and ``saliency`` are unused)."""
    return {f"{FAMILY}.overlap": overlap(layout), f"{FAMILY}.alignment": alignment(layout)}
