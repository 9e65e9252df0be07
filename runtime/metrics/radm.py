"""RADM's layout metrics (Li et al., CIKM 2023: "Relation-Aware Diffusion Model for Controllable
Poster Layout Generation"), from their definitions.

RADM pools R_ove over all element pairs, R_und over all underlays and R_com over all text boxes of
the test set, and averages R_ali and occupancy per layout; the tallies below reproduce that. RADM
scores every predicted element (no validity filter). Choices are listed in docs/metrics.md.
"""
from __future__ import annotations

import numpy as np

from .base import HIGHER, LOWER, UNDEFINED, MetricInfo, Tally
from .geometry import alignment_gaps, areas, integral_image, intersections, pixel_spans, safe_ratio, span_sums
from .layout import DECORATIVE, TEXT, UNDERLAY, Layout
from .sobel import gradient_magnitude

FAMILY = "radm"
#: RADM's evaluation keeps -log(1 - gap) finite with an epsilon of 1e-6; clipping the gap gives the
#: same bound (-ln 1e-6 = 13.8) without shifting perfectly aligned elements below 0.
MAX_GAP = 1.0 - 1e-6
#: Sobel needs a 3x3 window: smaller text boxes have no gradient and are skipped, as in RADM's script.
MIN_SOBEL_SIZE = 3

METRICS = (
    MetricInfo(f"{FAMILY}.R_ove", LOWER, "[0, 1]", "boxes", "pairs",
               "|Si ∩ Sj| / |Si| over ordered pairs of non-decorative elements"),
    MetricInfo(f"{FAMILY}.R_und", HIGHER, "[0, 1]", "boxes", "underlays",
               "per underlay, the largest share of a non-underlay element it covers"),
    MetricInfo(f"{FAMILY}.R_ali", LOWER, "[0, 13.8]", "boxes", "layouts",
               "mean over elements of -ln(1 - smallest anchor gap to another element); layouts with 2+ elements"),
    MetricInfo(f"{FAMILY}.occupancy", HIGHER, "[0, 1]", "boxes", "layouts",
               "share of layouts with at least one element"),
    MetricInfo(f"{FAMILY}.R_com", LOWER, "[0, 1442]", "image", "text boxes",
               "mean Sobel gradient magnitude (gray 0..255) inside each text box"),
)


def overlap(layout: Layout) -> Tally:
    """R_ove: |S_i ∩ S_j| / |S_i| summed over ordered pairs i != j of elements that are neither
    underlay nor embellishment, counted per pair. Pairs whose S_i has no area are skipped (the
    ratio is undefined)."""
    boxes = layout.boxes[layout.graphic & ~layout.where(*DECORATIVE)]
    area = areas(boxes)
    counted = (area[:, None] > 0) & ~np.eye(len(boxes), dtype=bool)
    if not counted.any():
        return UNDEFINED
    ratios = safe_ratio(intersections(boxes, boxes), area[:, None])
    return Tally(float(ratios[counted].sum()), int(counted.sum()))


def underlay(layout: Layout) -> Tally:
    """R_und: for each underlay, max over the other (non-underlay) elements e of |underlay ∩ e| / |e|;
    counted per underlay. An underlay with nothing to hold scores 0."""
    underlays = layout.boxes[layout.where(UNDERLAY)]
    if len(underlays) == 0:
        return UNDEFINED
    others = layout.boxes[layout.graphic & ~layout.where(UNDERLAY)]
    others = others[areas(others) > 0]  # a zero-area element cannot be covered by a share
    if len(others) == 0:
        return Tally(0.0, len(underlays))
    covered = safe_ratio(intersections(underlays, others), areas(others)[None, :])
    return Tally(float(covered.max(axis=1).sum()), len(underlays))


def alignment(layout: Layout) -> Tally:
    """R_ali: mean over elements of min(-ln(1 - dx / W), -ln(1 - dy / H)), where dx (dy) is the
    smallest distance between this element's left, centre or right (top, middle or bottom) and the
    same anchor of another element. Undefined for fewer than two elements."""
    boxes = layout.boxes[layout.graphic]
    if len(boxes) < 2:
        return UNDEFINED
    gaps = np.clip(alignment_gaps(boxes, layout.width, layout.height), 0.0, MAX_GAP)
    return Tally.mean_of_one(float(-np.log(1.0 - gaps).mean()))


def occupancy(layout: Layout) -> Tally:
    """1 for a layout with at least one element, else 0: averaged, the share of non-empty layouts."""
    return Tally.mean_of_one(1.0 if layout.graphic.any() else 0.0)


def readability(layout: Layout, gray: np.ndarray | None) -> Tally:
    """R_com: for each text box, the mean of sqrt(gx^2 + gy^2) of the Sobel filter run inside the box
    only (no padding) on the gray canvas (0..255); counted per text box."""
    if gray is None:
        return UNDEFINED
    spans = pixel_spans(layout.boxes[layout.where(TEXT)], layout.width, layout.height)
    # A box of w x h pixels holds (w-2) x (h-2) full 3x3 windows.
    inner = spans.copy()
    inner[:, 2:] -= MIN_SOBEL_SIZE - 1
    inner = inner[(inner[:, 2] > inner[:, 0]) & (inner[:, 3] > inner[:, 1])]
    if len(inner) == 0:
        return UNDEFINED
    # The gradient of the whole canvas, once: output pixel (r, c) is the window with top-left (r, c),
    # so the windows inside a box start at its corner and stop 2 pixels before its far edges.
    table = integral_image(gradient_magnitude(gray, "valid"))
    window_counts = (inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])
    return Tally(float((span_sums(table, inner) / window_counts).sum()), len(inner))


def evaluate(layout: Layout, gray: np.ndarray | None = None, saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """All RADM metrics of one layout (``saliency`` is unused: RADM has no saliency metric)."""
    return {
        f"{FAMILY}.R_ove": overlap(layout),
        f"{FAMILY}.R_und": underlay(layout),
        f"{FAMILY}.R_ali": alignment(layout),
        f"{FAMILY}.occupancy": occupancy(layout),
        f"{FAMILY}.R_com": readability(layout, gray),
    }
