"""The ``radm`` protocol: RADM's metrics as its public ``metrics.py`` computes them.

liuan0803/RADM, ``metrics.py`` (commit 413f87a4): the numbers of RADM's table (CIKM 2023, CGL).
Written from reading that script, quirks kept on purpose (docs/metrics.md compares them with the
``posterrt`` protocol):

- boxes are pixel x, y, w, h on the image; every element counts (no validity filter);
- R_ove pools |S_i ∩ S_j| / |S_i| over ordered pairs of elements other than underlay (3) and
  embellishment (4), skipping a pair whose two records are equal (its ``l != lay`` compares the
  whole prediction, so duplicates never overlap each other);
- R_und pools, per underlay, the largest share of any other element it covers;
- R_ali: per element, the smallest distance of its left, centre or right (top, middle, bottom) to
  the same anchor of another element, capped at the image's width (height), scored
  min(-ln(1 - dx/W + 1e-6), -ln(1 - dy/H + 1e-6)); mean per layout of 2+ elements, then over them;
- R_com pools, per text box (category 1), the mean Sobel magnitude inside the crop
  ``(int(x), int(y), int(x) + int(w), int(y) + int(h))`` of Pillow's gray image: the crop pads
  with black outside the image, and a crop under 3 x 3 pixels is skipped (the convolution fails);
- R_ove, R_und and R_com print 0 when nothing was counted; occupancy is the share of images with a
  prediction.
"""
from __future__ import annotations

import numpy as np

from .base import HIGHER, LOWER, NOT_MEASURED, MetricInfo, Tally
from .layout import EMBELLISHMENT, LOGO, PRODUCT, TEXT, UNDERLAY, Layout
from .posterlayout_script import script_ids
from .sobel import sobel

FAMILY = "radm"
#: RADM's category ids as metrics.py reads them: text 1 ("only for text area"), underlay 3,
#: embellishment 4 (its comments); logo 2, the fourth class RADM predicts.
CLASS_IDS = {1: TEXT, 2: LOGO, 3: UNDERLAY, 4: EMBELLISHMENT}
TEXT_ID, UNDERLAY_ID, EMBELLISHMENT_ID = 1, 3, 4
EPSILON = 10e-7  # as written in the script: 1e-6

METRICS = (
    MetricInfo(f"{FAMILY}.R_ove", LOWER, "[0, 1]", "boxes", "pairs",
               "|Si ∩ Sj| / |Si| over ordered pairs of non-decorative elements, equal records skipped",
               empty_value=0.0),
    MetricInfo(f"{FAMILY}.R_und", HIGHER, "[0, 1]", "boxes", "underlays",
               "per underlay, the largest share of another element it covers", empty_value=0.0),
    MetricInfo(f"{FAMILY}.R_ali", LOWER, "[-1e-6, 13.8]", "boxes", "layouts",
               "mean over elements of min over axes of -ln(1 - gap + 1e-6); layouts with 2+ elements"),
    MetricInfo(f"{FAMILY}.occupancy", HIGHER, "[0, 1]", "boxes", "layouts",
               "share of layouts with at least one element"),
    MetricInfo(f"{FAMILY}.R_com", LOWER, "[0, 1442]", "image", "text boxes",
               "mean Sobel magnitude in each text box's int-truncated crop (black outside the image)",
               empty_value=0.0),
)


def _records(layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, w, h (float64 [n, 4]), category ids [n] and scores [n] (NaN where absent)."""
    _, ids = script_ids(layout, CLASS_IDS, FAMILY)
    graphic = ~layout.where(PRODUCT)
    ltrb = layout.boxes[graphic]  # float64 pixels: RADM's predictions are JSON floats
    xywh = np.stack([ltrb[:, 0], ltrb[:, 1], ltrb[:, 2] - ltrb[:, 0], ltrb[:, 3] - ltrb[:, 1]], axis=1)
    scores = np.asarray([np.nan if s is None else s for s in (layout.scores or (None,) * len(layout))], np.float64)
    return xywh.reshape(-1, 4), ids, scores[graphic]


def _corners(xywh: np.ndarray) -> tuple[np.ndarray, ...]:
    x, y, w, h = xywh.T
    return x, y, x + w, y + h


def _covered(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[len(first), len(second)] intersection areas, as the script's max(min(...) - max(...), 0)."""
    x1, y1, x2, y2 = (c[:, None] for c in _corners(first))
    x3, y3, x4, y4 = (c[None, :] for c in _corners(second))
    return np.maximum(np.minimum(x2, x4) - np.maximum(x1, x3), 0) * np.maximum(np.minimum(y2, y4) - np.maximum(y1, y3), 0)


def overlap(layout: Layout) -> Tally:
    """R_ove. A pair whose S_i has no area is skipped (the script divides by zero there)."""
    xywh, ids, scores = _records(layout)
    keep = (ids != UNDERLAY_ID) & (ids != EMBELLISHMENT_ID)
    xywh, ids, scores = xywh[keep], ids[keep], scores[keep]
    same_score = (scores[:, None] == scores[None, :]) | (np.isnan(scores)[:, None] & np.isnan(scores)[None, :])
    equal = np.all(xywh[:, None, :] == xywh[None, :, :], axis=2) & (ids[:, None] == ids[None, :]) & same_score
    area = xywh[:, 2] * xywh[:, 3]
    counted = ~equal & (area[:, None] != 0)
    if not counted.any():
        return Tally()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = _covered(xywh, xywh) / area[:, None]
    return Tally(float(ratios[counted].sum()), int(counted.sum()))


def underlay(layout: Layout) -> Tally:
    """R_und. Elements without area are passed over (the script divides by zero there)."""
    xywh, ids, _ = _records(layout)
    underlays, others = xywh[ids == UNDERLAY_ID], xywh[ids != UNDERLAY_ID]
    others = others[others[:, 2] * others[:, 3] != 0]
    if len(underlays) == 0:
        return Tally()
    if len(others) == 0:
        return Tally(0.0, len(underlays))
    shares = _covered(others, underlays) / (others[:, 2] * others[:, 3])[:, None]  # [other, underlay]
    return Tally(float(np.maximum(shares.max(axis=0), 0).sum()), len(underlays))


def _axis_gaps(start: np.ndarray, size: np.ndarray, limit: int) -> np.ndarray:
    """Per element, min over the others j of |start|, |centre|, |end| differences (written as the
    script orders its sums), capped at ``limit`` as its loop starts from the image size."""
    starts = np.abs(start[None, :] - start[:, None])
    centres = np.abs(start[None, :] + size[None, :] / 2 - start[:, None] - size[:, None] / 2)
    ends = np.abs(start[None, :] + size[None, :] - start[:, None] - size[:, None])
    gaps = np.minimum(np.minimum(starts, centres), ends)
    np.fill_diagonal(gaps, np.inf)
    return np.minimum(gaps.min(axis=1), limit)


def alignment(layout: Layout) -> Tally:
    """R_ali of one layout; undefined for fewer than two elements (the script skips it)."""
    xywh, _, _ = _records(layout)
    if len(xywh) <= 1:
        return Tally()
    gap_x = _axis_gaps(xywh[:, 0], xywh[:, 2], layout.width)
    gap_y = _axis_gaps(xywh[:, 1], xywh[:, 3], layout.height)
    score_x = -np.log(1.0 - gap_x / layout.width + EPSILON)
    score_y = -np.log(1.0 - gap_y / layout.height + EPSILON)
    return Tally.mean_of_one(float(np.minimum(score_x, score_y).mean()))


def occupancy(layout: Layout) -> Tally:
    """R_occ: the script divides the images with a prediction by all images."""
    xywh, _, _ = _records(layout)
    return Tally.mean_of_one(1.0 if len(xywh) else 0.0)


def crop(gray: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """Pillow's ``Image.crop``: the box's pixels, black where it lies outside the image."""
    out = np.zeros((max(bottom - top, 0), max(right - left, 0)), dtype=gray.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(bottom, gray.shape[0]), min(right, gray.shape[1])
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top:src_bottom - top, src_left - left:src_right - left] = gray[src_top:src_bottom, src_left:src_right]
    return out


def readability(layout: Layout, gray: np.ndarray | None) -> Tally:
    """R_com over the layout's text boxes; ``gray``: Pillow's ``convert("L")`` of the image, 0..255."""
    if gray is None:
        return NOT_MEASURED
    xywh, ids, _ = _records(layout)
    total, count = 0.0, 0
    for x, y, w, h in xywh[ids == TEXT_ID].tolist():
        left, top = int(x), int(y)
        patch = crop(gray, left, top, left + int(w), top + int(h))
        if min(patch.shape) < 3:
            continue  # the script's 3x3 convolution raises and the box is skipped
        gx, gy = sobel(patch, "valid")
        # Squares of these integer slopes are exact in float32; the sqrt and mean were float32 there.
        magnitude = np.sqrt((gx * gx + gy * gy).astype(np.float32))
        total += float(np.float32(magnitude.mean(dtype=np.float64)))
        count += 1
    return Tally(total, count)


def evaluate(layout: Layout, gray: np.ndarray | None = None, saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """Every metric of RADM's metrics.py for one layout (``saliency`` is unused)."""
    return {
        f"{FAMILY}.R_ove": overlap(layout),
        f"{FAMILY}.R_und": underlay(layout),
        f"{FAMILY}.R_ali": alignment(layout),
        f"{FAMILY}.occupancy": occupancy(layout),
        f"{FAMILY}.R_com": readability(layout, gray),
    }
