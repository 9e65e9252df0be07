"""The pixels a metric reads, brought onto a layout's canvas: the gray canvas image (for the
readability metrics) and any 2-D map (saliency, product mask) given at another resolution.

Accepted sources: a file path, a PIL image, or a numpy array (RGB uint8 HxWx3, or 2-D).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..images import open_image
from .layout import Layout

#: A map (saliency, mask) whose aspect ratio differs from the canvas by more than this is for
#: another image: resizing it would misplace the product.
ASPECT_TOLERANCE = 0.02


def to_pil(source, field: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        return open_image(Path(source), field)
    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            if array.ndim != 2:
                raise InputError(f"{field}: got a {array.dtype} array of shape {array.shape}, expected RGB uint8 "
                                 f"HxWx3 or a 2-D map")
            return Image.fromarray(np.asarray(array, dtype=np.float32))  # mode "F"
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
            return Image.fromarray(array)
        raise InputError(f"{field}: got a uint8 array of shape {array.shape}, expected HxWx3 (RGB) or HxW")
    raise InputError(f"{field}: got {type(source).__name__}, expected a file path, a PIL image or a numpy array")


def canvas_gray(source, layout: Layout, field: str = "--images") -> np.ndarray:
    """The canvas as gray levels 0..255 (float64 ``[height, width]``), ITU-R 601 luma as Pillow's
    ``convert("L")``. It must have the layout's size exactly: box pixels are read from it."""
    image = to_pil(source, field)
    if image.size != (layout.width, layout.height):
        raise InputError(f"{field}: image for {layout.source} is {image.size[0]}x{image.size[1]}, expected the "
                         f"layout's canvas {layout.width}x{layout.height}")
    if image.mode == "F":
        return np.asarray(image, dtype=np.float64)
    return np.asarray(image.convert("L"), dtype=np.float64)


def map_on_canvas(source, layout: Layout, field: str) -> np.ndarray:
    """A 2-D map in 0..1 (float64 ``[height, width]``): uint8 / image sources are divided by 255,
    float arrays are taken as 0..1. Resized (bilinear) when it has the canvas's aspect ratio but
    another size, as PosterLayout resizes its saliency maps."""
    image = to_pil(source, field)
    width, height = image.size
    if (width, height) != (layout.width, layout.height):
        if abs(width / height - layout.width / layout.height) > ASPECT_TOLERANCE * layout.width / layout.height:
            raise InputError(f"{field}: map for {layout.source} is {width}x{height}, expected the canvas size "
                             f"{layout.width}x{layout.height} or the same aspect ratio")
        image = (image if image.mode == "F" else image.convert("L")).resize(
            (layout.width, layout.height), Image.Resampling.BILINEAR)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise InputError(f"{field}: float map for {layout.source} spans {values.min():g}..{values.max():g}, "
                             f"expected values in 0..1 (or a uint8 map in 0..255)")
        return values
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
