"""The 3x3 Sobel operator in numpy, for the readability metrics (text over busy backgrounds).

Both papers measure readability as the image gradient under text boxes. Sobel is applied as a
cross-correlation (what ``torch.nn.Conv2d`` and ``cv2.Sobel`` compute); the gradient magnitude does
not depend on that sign convention.
"""
from __future__ import annotations

import numpy as np

BORDERS = ("valid", "reflect")


def sobel(gray: np.ndarray, border: str = "valid") -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical derivatives of a 2-D image.

    ``valid``: only where the 3x3 window fits, output ``(H-2, W-2)`` (RADM's unpadded Conv2d).
    ``reflect``: same size as the input, edges mirrored without repeating the border pixel
    (OpenCV's default BORDER_REFLECT_101, which PosterLayout's evaluation uses).
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    image = np.asarray(gray, dtype=np.float64)
    assert image.ndim == 2, image.shape
    if border == "reflect":
        if min(image.shape) < 2:  # reflection needs a neighbour: a 1-pixel line has no gradient
            return np.zeros_like(image), np.zeros_like(image)
        image = np.pad(image, 1, mode="reflect")
    if min(image.shape) < 3:
        empty = np.zeros((max(image.shape[0] - 2, 0), max(image.shape[1] - 2, 0)))
        return empty, empty.copy()
    # Rows above / middle / below and columns left / right of each output pixel.
    top, middle, bottom = image[:-2], image[1:-1], image[2:]
    smoothed_rows = top + 2 * middle + bottom  # vertical smoothing [1, 2, 1]
    gx = smoothed_rows[:, 2:] - smoothed_rows[:, :-2]
    left, centre, right = image[:, :-2], image[:, 1:-1], image[:, 2:]
    smoothed_cols = left + 2 * centre + right  # horizontal smoothing [1, 2, 1]
    gy = smoothed_cols[2:, :] - smoothed_cols[:-2, :]
    return gx, gy


def gradient_magnitude(gray: np.ndarray, border: str = "valid") -> np.ndarray:
    """sqrt(gx^2 + gy^2). (np.hypot guards overflow we cannot have here, at several times the cost.)"""
    gx, gy = sobel(gray, border)
    gx *= gx
    gy *= gy
    gx += gy
    return np.sqrt(gx, out=gx)
