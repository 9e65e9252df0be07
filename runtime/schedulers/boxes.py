"""Box geometry for the layout samplers in numpy: format conversions, IoU, class-wise NMS.

Boxes are ``[..., 4]`` arrays: ``xyxy`` = (x1, y1, x2, y2), ``cxcywh`` = (centre x, centre y,
width, height). torchvision does not import in the runtime, so NMS is written here.
"""
from __future__ import annotations

import numpy as np


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = np.moveaxis(boxes, -1, 0)
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (xyxy) -> [N, M].

    A pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(bottom_right - top_left, 0, None)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy class-wise non-maximum suppression, as torchvision's ``batched_nms``.

    Visiting boxes from the highest score down, a box is kept unless an already kept box of the
    same label overlaps it with IoU > ``iou_threshold``. Returns the kept indices, best first.
    The IoU matrix is computed once; the greedy pass is one vectorized row update per kept box.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, labels = boxes[order], labels[order]
    suppresses = (pairwise_iou(boxes, boxes) > iou_threshold) & (labels[:, None] == labels[None, :])
    alive = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if alive[i]:
            alive[i + 1:] &= ~suppresses[i, i + 1:]
    return order[alive]


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """xyxy boxes clipped to the image [0, width] x [0, height]."""
    limits = np.array([width, height, width, height], dtype=boxes.dtype)
    return np.clip(boxes, 0, limits)
