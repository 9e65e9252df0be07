"""Vectorized box geometry shared by the metric families: areas, pairwise intersections, alignment
gaps, and the rasterization of boxes onto the pixel grid.

Boxes are float arrays ``[n, 4]`` in pixel x1y1x2y2. A pixel (column c, row r) belongs to a box when
its centre (c + 0.5, r + 0.5) lies in [x1, x2) x [y1, y2): integer boxes cover columns x1..x2-1,
rows y1..y2-1, as a numpy slice ``[y1:y2, x1:x2]`` would.
"""
from __future__ import annotations

import numpy as np


def areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` areas of pairwise intersection (0 for disjoint or touching boxes)."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def contains(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``[len(outer), len(inner)]``: True where inner box j lies entirely inside outer box i."""
    return ((outer[:, None, 0] <= inner[None, :, 0]) & (outer[:, None, 1] <= inner[None, :, 1])
            & (inner[None, :, 2] <= outer[:, None, 2]) & (inner[None, :, 3] <= outer[:, None, 3]))


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a zero-area box covers nothing)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=np.broadcast_to(denominator, out.shape) > 0)
    return out


def clipped_areas(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area of each box inside the ``width`` x ``height`` canvas."""
    clipped = np.stack([np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
                        np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1)
    return areas(clipped)


def alignment_anchors(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[n, 6]`` left, centre, right (/ width) and top, middle, bottom (/ height) of each box."""
    x1, y1, x2, y2 = boxes.T
    return np.stack([x1 / width, (x1 + x2) / 2 / width, x2 / width,
                     y1 / height, (y1 + y2) / 2 / height, y2 / height], axis=1)


def alignment_gaps(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """For each element, the smallest normalized distance between one of its six anchors and the same
    anchor of another element (``inf`` when it is alone): 0 means aligned with some element.

    This is the quantity inside AC-LayoutGAN's alignment loss, which LayoutGAN++, PosterLayout and
    RADM all take as their alignment metric."""
    anchors = alignment_anchors(boxes, width, height)
    gaps = np.abs(anchors[:, None, :] - anchors[None, :, :])  # [i, j, anchor]
    gaps[np.arange(len(boxes)), np.arange(len(boxes)), :] = np.inf  # an element never aligns with itself
    return gaps.min(axis=(1, 2)) if len(boxes) else np.zeros(0)


def pixel_spans(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[n, 4]`` int x0, y0, x1, y1 (exclusive ends) of the pixels each box covers, inside the canvas."""
    spans = np.ceil(boxes - 0.5).astype(np.int64)
    spans[:, 0::2] = np.clip(spans[:, 0::2], 0, width)
    spans[:, 1::2] = np.clip(spans[:, 1::2], 0, height)
    spans[:, 2] = np.maximum(spans[:, 2], spans[:, 0])
    spans[:, 3] = np.maximum(spans[:, 3], spans[:, 1])
    return spans


def union_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boolean ``[height, width]`` mask of the pixels covered by any box.

    Built from a 2-D difference array (+1/-1 at the corners, then cumulative sums), so the cost is
    one pass over the canvas whatever the number of boxes."""
    spans = pixel_spans(boxes, width, height)
    counts = np.zeros((height + 1, width + 1), dtype=np.int32)  # int32 sums run twice as fast
    x0, y0, x1, y1 = spans.T
    np.add.at(counts, (y0, x0), 1)
    np.add.at(counts, (y0, x1), -1)
    np.add.at(counts, (y1, x0), -1)
    np.add.at(counts, (y1, x1), 1)
    np.cumsum(counts, axis=0, out=counts)
    np.cumsum(counts, axis=1, out=counts)
    return counts[:height, :width] > 0


def integral_image(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: sum over [y0:y1, x0:x1] in four lookups."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    return table


def span_sums(table: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Sum of the values inside each ``[x0, y0, x1, y1]`` span, from an :func:`integral_image`."""
    x0, y0, x1, y1 = spans.T
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
