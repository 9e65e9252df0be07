"""Saliency for PosterLayout's utility and occlusion: where the eye goes, 0..1 per canvas pixel.

PosterLayout uses saliency detectors' maps (the maximum of two). posterrt takes such a map when the
user has one (grayscale image, 0..255); otherwise it builds a documented stand-in from what a poster
pipeline knows, the product: its cutout mask, or else the product boxes a PlanNet layout places.
The stand-in is the binary product region blurred with a Gaussian (sigma = 2% of the canvas's
shorter side) and divided by its maximum: detectors' maps are soft and spill slightly past the
object's edge, so text that hugs the product is partly penalized rather than not at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ..images import MASK_THRESHOLD
from .canvas import map_on_canvas
from .geometry import union_mask
from .layout import PRODUCT, Layout

#: Gaussian sigma of the stand-in, as a fraction of the canvas's shorter side.
BLUR_FRACTION = 0.02


@dataclass(frozen=True)
class Saliency:
    values: np.ndarray | None  # float64 [height, width] in 0..1, or None when there is no source
    source: str | None  # what it was made from, for the report ("map x.png", "product mask m.png", ...)


def stand_in_from_region(region: np.ndarray) -> np.ndarray:
    """Blurred, max-normalized float map of a boolean product region (all 0 if the region is empty)."""
    height, width = region.shape
    sigma = max(1.0, BLUR_FRACTION * min(width, height))
    # Pillow's GaussianBlur radius is the standard deviation; it blurs 8-bit images, and 256 levels
    # are finer than any saliency detector's output.
    image = Image.fromarray(np.where(region, 255, 0).astype(np.uint8))
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    peak = blurred.max()
    return blurred / peak if peak > 0 else blurred


def from_mask(source, layout: Layout, field: str = "--masks") -> np.ndarray:
    """Stand-in from a product mask (white = product), resized to the canvas if needed."""
    mask = map_on_canvas(source, layout, field)
    return stand_in_from_region(mask > MASK_THRESHOLD)


def from_product_boxes(layout: Layout) -> np.ndarray | None:
    """Stand-in from the layout's own product boxes (PlanNet places the product); None if it has none."""
    boxes = layout.boxes[layout.where(PRODUCT)]
    if len(boxes) == 0:
        return None
    return stand_in_from_region(union_mask(boxes, layout.width, layout.height))


def resolve(layout: Layout, saliency_map=None, mask=None, *, map_name: str = "", mask_name: str = "",
            map_field: str = "--saliency", mask_field: str = "--masks") -> Saliency:
    """The best saliency available for ``layout``: a given map, else the mask stand-in, else the
    product-box stand-in, else none (utility and occlusion are then undefined for this layout)."""
    if saliency_map is not None:
        return Saliency(map_on_canvas(saliency_map, layout, map_field), f"map {map_name}".strip())
    if mask is not None:
        return Saliency(from_mask(mask, layout, mask_field), f"product mask {mask_name}".strip())
    values = from_product_boxes(layout)
    if values is not None:
        return Saliency(values, "product boxes")
    return Saliency(None, None)
