"""The ``posterlayout`` protocol: PosterLayout's metrics as its public ``eval.py`` computes them.

PKU-ICST-MIPL/PosterLayout-CVPR2023, ``eval.py`` (commit bd236f20): the numbers of the paper's
table. Written from reading that script, quirks kept on purpose (docs/metrics.md lists them against
the ``posterrt`` protocol's corrected definitions):

- the canvas is the script's pixel frame (it hard-codes 513 x 750); an element is invalid when
  ``|(min(W, r) - max(0, l)) * (min(H, b) - max(0, t))|`` is under W*H/1000 (the absolute value lets
  a box outside on both axes pass) and every later metric drops invalid elements;
- overlap sums IoU over pairs of text and logo elements and divides by their number;
- alignment gives each of a layout's n elements the same value, g(D), D the smallest anchor gap
  over *all* pairs of the layout (its loop never uses the element index): n * -log10(1 - D);
- the strict underlay test compares the inner box's right edge with itself (never false);
- pixel masks truncate box coordinates with ``int`` and slice with them, so a negative coordinate
  counts from the far edge (Python slicing);
- saliency is the element-wise max of the maps (PFPN and BASNet), each resized bicubic to the canvas;
- readability reads OpenCV's gray, a uint8 Sobel (negative slopes clipped to 0, squares wrapping
  modulo 256), normalized by its maximum and truncated to 8 bits;
- utility, occlusion and readability score 0 where nothing is measured, and every mean is over all
  layouts (underlay metrics: over layouts with an underlay, 0 if none has one).

Arithmetic follows the script's float32 arrays where it decides an outcome (validity, pixel
truncation, IoU, anchors); sums are float64 as numpy promotes them there.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import InputError
from .base import HIGHER, LOWER, NOT_MEASURED, MetricInfo, Tally
from .canvas import to_pil
from .layout import LOGO, PRODUCT, TEXT, UNDERLAY, Layout
from .sobel import sobel

FAMILY = "posterlayout"
#: PKU PosterLayout's class ids as eval.py reads ``clses`` (0 = empty slot): text 1, underlay 3
#: (its comments), logo 2.
CLASS_IDS = {1: TEXT, 2: LOGO, 3: UNDERLAY}
TEXT_ID, UNDERLAY_ID = 1, 3
#: The script's gap for a layout whose smallest anchor gap reaches 1 (there its log fails).
MAX_GAP = 1.0 - 1e-6

METRICS = (
    MetricInfo(f"{FAMILY}.validity", HIGHER, "[0, 1]", "boxes", "elements",
               "share of elements whose |clipped area| is at least 0.1% of the canvas"),
    MetricInfo(f"{FAMILY}.overlap", LOWER, "[0, (n-1)/2]", "boxes", "layouts",
               "sum of IoU over pairs of valid text/logo elements, divided by their number; 0 without one"),
    MetricInfo(f"{FAMILY}.alignment", LOWER, "[0, 6n]", "boxes", "layouts",
               "n * -log10(1 - D), D the layout's smallest anchor gap over all pairs; 0 for 0-1 elements"),
    MetricInfo(f"{FAMILY}.underlay_loose", HIGHER, "[0, 1]", "boxes", "layouts",
               "per underlay, the largest share of a non-underlay element it covers; layouts with underlays",
               empty_value=0.0),
    MetricInfo(f"{FAMILY}.underlay_strict", HIGHER, "[0, 1]", "boxes", "layouts",
               "share of underlays holding a non-underlay element (right edge unchecked); layouts with underlays",
               empty_value=0.0),
    MetricInfo(f"{FAMILY}.utility", HIGHER, "[0, 1]", "saliency", "layouts",
               "share of the non-salient area (weighted by 1 - saliency) the elements cover; 0 if none"),
    MetricInfo(f"{FAMILY}.occlusion", LOWER, "[0, 1]", "saliency", "layouts",
               "mean saliency under the elements; 0 for a layout covering nothing"),
    MetricInfo(f"{FAMILY}.readability", LOWER, "[0, 1]", "image", "layouts",
               "mean 8-bit uint8-Sobel gradient under text not on an underlay; 0 without such pixels"),
)


# ---------------------------------------------------------------------------------------------
# The elements as the script holds them: float32 pixel boxes and class ids, invalid ones dropped
# ---------------------------------------------------------------------------------------------
def script_ids(layout: Layout, class_ids: dict[int, str], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 boxes [n, 4] and the script's ids [n] of the layout's graphic elements (the product,
    content rather than a predicted element, is not one). A class the script has no id for is an error."""
    ids_by_name = {name: class_id for class_id, name in class_ids.items()}
    keep = ~layout.where(PRODUCT)
    unknown = sorted({name for name in np.asarray(layout.classes, dtype=object)[keep] if name not in ids_by_name})
    if unknown:
        known = ", ".join(f"{name}={class_id}" for class_id, name in sorted(class_ids.items()))
        raise InputError(f"{layout.source}: class {unknown[0]!r} has no id in the {protocol} protocol's benchmark "
                         f"({known}); use --protocol posterrt")
    ids = np.asarray([ids_by_name[name] for name in np.asarray(layout.classes, dtype=object)[keep]], dtype=np.int64)
    return layout.boxes[keep].astype(np.float32), ids


def _clamped_extent(low: np.ndarray, high: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """``min(limit, high) - max(0, low)`` as the script evaluates it on numpy float32 scalars: float32
    when neither bound was replaced; where Python's ``max``/``min`` returned the int, numpy promotes
    the difference to float64. Returns the extent (float64) and where it stayed float32."""
    kept_low, kept_high = low > 0, high < limit
    in_float32 = kept_low & kept_high
    extent = np.where(kept_high, high.astype(np.float64), float(limit)) - np.where(kept_low, low.astype(np.float64), 0.0)
    extent32 = (high - low).astype(np.float64)  # a float32 difference, exact in float64
    return np.where(in_float32, extent32, extent), in_float32


def valid_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """The script's validity test (``metrics_val`` and ``getRidOfInvalid``)."""
    if len(boxes) == 0:
        return np.zeros(0, bool)
    w, w32 = _clamped_extent(boxes[:, 0], boxes[:, 2], width)
    h, h32 = _clamped_extent(boxes[:, 1], boxes[:, 3], height)
    area = np.where(w32 & h32, (w.astype(np.float32) * h.astype(np.float32)).astype(np.float64), w * h)
    # 5.13 * 7.50 * 10 in the script: 0.1% of its 513 x 750 canvas, written the same way here.
    threshold = width / 100 * (height / 100) * 10
    return ~(np.abs(area) < threshold)


def _valid_elements(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    boxes, ids = script_ids(layout, CLASS_IDS, FAMILY)
    keep = valid_mask(boxes, layout.width, layout.height)
    return boxes[keep], ids[keep]


# ---------------------------------------------------------------------------------------------
# Box metrics
# ---------------------------------------------------------------------------------------------
def validity(layout: Layout) -> Tally:
    """Valid elements / elements, pooled over the set (``metrics_val``)."""
    boxes, _ = script_ids(layout, CLASS_IDS, FAMILY)
    return Tally(float(valid_mask(boxes, layout.width, layout.height).sum()), len(boxes))


def _pairwise_intersections32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``[len(a), len(b)]`` intersection areas, 0 where either extent is <= 0."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.where((width > 0) & (height > 0), width * height, np.float32(0))


def _areas32(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def overlap(layout: Layout) -> Tally:
    """Sum over pairs i < j of IoU among valid text and logo elements, divided by their number.
    (The script divides 0 by 0 and stops on a layout without one; here that layout scores 0.)"""
    boxes, ids = _valid_elements(layout)
    boxes = boxes[ids != UNDERLAY_ID]
    if len(boxes) == 0:
        return Tally.mean_of_one(0.0)
    inter = _pairwise_intersections32(boxes, boxes)
    area = _areas32(boxes)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / ((area[:, None] + area[None, :]) - inter)
    first, second = np.triu_indices(len(boxes), k=1)
    return Tally.mean_of_one(float(np.cumsum(iou[first, second].astype(np.float64))[-1]) / len(boxes)
                             if len(first) else 0.0)


def alignment(layout: Layout) -> Tally:
    """n * -log10(1 - D) over the n valid elements (underlays included), D the smallest difference of
    one anchor (left, top, centre x, centre y, right, bottom; normalized) between any two elements."""
    boxes, _ = _valid_elements(layout)
    if len(boxes) <= 1:
        return Tally.mean_of_one(0.0)
    scale = np.asarray([layout.width, layout.height, layout.width, layout.height], dtype=np.float32)
    normalized = boxes / scale  # float32, as the script divides its float32 rows in place
    left, top, right, bottom = normalized.T.astype(np.float64)
    # (l + r) is a float32 sum; the script's "/ 2" makes the centre (and so the whole array) float64.
    centre_x = (normalized[:, 0] + normalized[:, 2]).astype(np.float64) / 2
    centre_y = (normalized[:, 1] + normalized[:, 3]).astype(np.float64) / 2
    anchors = np.stack([left, top, centre_x, centre_y, right, bottom], axis=1)
    first, second = np.triu_indices(len(boxes), k=1)
    smallest = float(np.abs(anchors[first] - anchors[second]).min())
    gap = smallest if smallest < 1 else MAX_GAP  # the script's log fails there; posterrt's bound instead
    per_element = -math.log(1 - gap) / math.log(10)
    total = 0.0
    for _ in range(len(boxes)):  # the script adds the same value once per element
        total += per_element
    return Tally.mean_of_one(total)


def _underlays_and_others(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    boxes, ids = _valid_elements(layout)
    return boxes[ids == UNDERLAY_ID], boxes[ids != UNDERLAY_ID]


def underlay_loose(layout: Layout) -> Tally:
    """Per underlay, the largest |u ∩ e| / |e| over the other valid elements (0 without any); mean
    over the layout's underlays. Layouts without an underlay are not counted."""
    underlays, others = _underlays_and_others(layout)
    if len(underlays) == 0:
        return Tally()
    if len(others) == 0:
        return Tally.mean_of_one(0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = _pairwise_intersections32(underlays, others) / _areas32(others)[None, :]
    # Python's max(best, share) keeps best when share is NaN (a zero-area element).
    best = np.fmax.reduce(np.concatenate([np.zeros((len(underlays), 1), np.float32), shares], axis=1), axis=1)
    return Tally.mean_of_one(float(np.cumsum(best.astype(np.float64))[-1]) / len(underlays))


def underlay_strict(layout: Layout) -> Tally:
    """Share of underlays u with an element e where u's left, top and bottom hold e's (the script's
    right-edge test compares e's right edge with itself)."""
    underlays, others = _underlays_and_others(layout)
    if len(underlays) == 0:
        return Tally()
    holds = ((underlays[:, None, 0] <= others[None, :, 0]) & (underlays[:, None, 1] <= others[None, :, 1])
             & (others[None, :, 2] >= others[None, :, 2]) & (underlays[:, None, 3] >= others[None, :, 3]))
    return Tally.mean_of_one(int(holds.any(axis=1).sum()) / len(underlays))


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------
def box_mask(boxes: np.ndarray, shape: tuple[int, int], value: float = 1.0, mask: np.ndarray | None = None) -> np.ndarray:
    """Paint ``boxes`` as the script does: coordinates truncated toward 0 (``np.array(..., dtype=int)``),
    then ``mask[t:b, l:r] = value`` with Python slicing (a negative index counts from the end)."""
    mask = np.zeros(shape) if mask is None else mask
    for left, top, right, bottom in np.asarray(boxes, dtype=np.float32).astype(np.int64).tolist():
        mask[top:bottom, left:right] = value
    return mask


def saliency_map(sources, layout: Layout, field: str = "--saliency") -> np.ndarray:
    """The element-wise max of the maps, each read as 8-bit gray, resized bicubic to the canvas
    (Pillow's default filter when the script ran) and divided by 255."""
    maps = []
    for index, source in enumerate(sources):
        image = to_pil(source, f"{field}[{index}]" if len(sources) > 1 else field)
        if image.mode == "F":
            raise InputError(f"{field}: a float map for {layout.source}; the posterlayout protocol reads 8-bit maps "
                             f"as the script does, expected a uint8 array or an image file")
        gray = image.convert("L").resize((layout.width, layout.height), Image.Resampling.BICUBIC)
        maps.append(np.asarray(gray, dtype=np.float64) / 255)
    return np.maximum.reduce(maps)


def utility(layout: Layout, saliency: np.ndarray | None) -> Tally:
    if saliency is None:
        return NOT_MEASURED
    boxes, _ = _valid_elements(layout)
    free = np.ones_like(saliency) - saliency
    covered = box_mask(boxes, saliency.shape)
    total_free, used = np.sum(free), np.sum(free * covered)
    return Tally.mean_of_one(used / total_free if total_free and used else 0.0)


def occlusion(layout: Layout, saliency: np.ndarray | None) -> Tally:
    if saliency is None:
        return NOT_MEASURED
    boxes, _ = _valid_elements(layout)
    covered = box_mask(boxes, saliency.shape)
    area, salient = np.sum(covered), np.sum(saliency[covered == 1])
    return Tally.mean_of_one(salient / area if salient and area else 0.0)


def opencv_gray(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_RGB2GRAY`` on uint8: 15-bit fixed-point BT.601 weights, rounded (checked
    against cv2 4.10 in docs/metrics.md; Pillow's ``convert("L")`` rounds differently)."""
    r, g, b = (rgb[..., channel].astype(np.int64) for channel in range(3))
    return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(np.uint8)


def gradient_8bit(image_source, layout: Layout, field: str = "--images") -> np.ndarray:
    """The script's ``img_to_g_xy`` / 255: the RGB canvas resized bicubic to the canvas size, OpenCV
    gray, Sobel saturated to uint8 per direction, ``((gx**2 + gy**2) / 2) ** 0.5`` with the squares
    and their sum wrapping in uint8, scaled to a maximum of 255 and truncated to 8 bits by Pillow."""
    image = to_pil(image_source, field).convert("RGB").resize((layout.width, layout.height),
                                                             Image.Resampling.BICUBIC)
    gray = opencv_gray(np.asarray(image))
    gx, gy = (np.clip(d, 0, 255).astype(np.uint8) for d in sobel(gray, "reflect"))
    with np.errstate(over="ignore"):
        magnitude = ((gx ** 2 + gy ** 2) / 2) ** 0.5
    peak = np.max(magnitude)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = magnitude / peak * 255  # a flat canvas gives NaN, which Pillow turns into 0
    return np.asarray(Image.fromarray(scaled).convert("L"), dtype=np.float64) / 255


def readability(layout: Layout, gradient: np.ndarray | None) -> Tally:
    if gradient is None:
        return NOT_MEASURED
    boxes, ids = _valid_elements(layout)
    text = box_mask(boxes[ids == TEXT_ID], gradient.shape)
    box_mask(boxes[ids == UNDERLAY_ID], gradient.shape, value=0.0, mask=text)
    area, total = np.sum(text), np.sum(gradient[text == 1])
    return Tally.mean_of_one(total / area if total and area else 0.0)


def evaluate(layout: Layout, gradient: np.ndarray | None = None, saliency: np.ndarray | None = None) -> dict[str, Tally]:
    """Every metric of eval.py for one layout: ``gradient`` from :func:`gradient_8bit`, ``saliency``
    from :func:`saliency_map`; a metric whose input is missing is undefined (not 0)."""
    return {
        f"{FAMILY}.validity": validity(layout),
        f"{FAMILY}.overlap": overlap(layout),
        f"{FAMILY}.alignment": alignment(layout),
        f"{FAMILY}.underlay_loose": underlay_loose(layout),
        f"{FAMILY}.underlay_strict": underlay_strict(layout),
        f"{FAMILY}.utility": utility(layout, saliency),
        f"{FAMILY}.occlusion": occlusion(layout, saliency),
        f"{FAMILY}.readability": readability(layout, gradient),
    }
