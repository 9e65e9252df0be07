"""Image agreement figures for accuracy reports: PSNR and SSIM, in numpy.

SSIM follows Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error visibility
to structural similarity" (IEEE TIP 2004) and their reference code ``ssim_index.m``: an 11x11
Gaussian window with sigma 1.5 (normalized to sum 1), K1 = 0.01, K2 = 0.03, dynamic range L = 255,
local statistics over the windows that fit inside the image ("valid"; no padding), the mean of the
SSIM map as the index. It is computed on luminance (ITU-R BT.601 luma of RGB), as the paper does
for colour images. No downsampling of large images (the later ``ssim.m`` adds one; posters are
compared at the size they were made).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import InputError

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03
#: ITU-R BT.601 luma weights of R, G, B (what Pillow's ``convert("L")`` uses, without its rounding).
LUMA = np.array([0.299, 0.587, 0.114])


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """1-D Gaussian weights summing to 1; the 2-D window is their outer product (separable)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-(offsets ** 2) / (2.0 * sigma ** 2))
    return weights / weights.sum()


def luminance(image: np.ndarray) -> np.ndarray:
    """float64 [H, W] luma of an RGB image [H, W, 3]; a gray image [H, W] is returned as float64."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.float64)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.astype(np.float64) @ LUMA
    raise InputError(f"image: expected RGB [H, W, 3] or gray [H, W], got shape {image.shape}")


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise InputError(f"images: shapes differ, {np.shape(a)} against {np.shape(b)}; compare images of one size")


def _filter_valid(plane: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local means over every window inside ``plane`` (rows, then columns)."""
    size = len(weights)
    rows = sliding_window_view(plane, size, axis=0) @ weights  # [H - size + 1, W]
    return sliding_window_view(rows, size, axis=1) @ weights  # [H - size + 1, W - size + 1]


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """The local SSIM of every window position, for two gray (or RGB -> luma) images."""
    _same_shape(a, b)
    x, y = luminance(a), luminance(b)
    if min(x.shape) < WINDOW_SIZE:
        raise InputError(f"images: {x.shape[1]}x{x.shape[0]} is smaller than the {WINDOW_SIZE}x{WINDOW_SIZE} SSIM window")
    weights = gaussian_window()
    mu_x, mu_y = _filter_valid(x, weights), _filter_valid(y, weights)
    var_x = _filter_valid(x * x, weights) - mu_x ** 2
    var_y = _filter_valid(y * y, weights) - mu_y ** 2
    cov = _filter_valid(x * y, weights) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM (1 for identical images, toward 0 for unrelated ones, negative for inverted structure)."""
    return float(ssim_map(a, b, data_range).mean())


def mse(a: np.ndarray, b: np.ndarray) -> float:
    _same_shape(a, b)
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over every channel; ``math.inf`` for identical images."""
    error = mse(a, b)
    return math.inf if error == 0 else 10.0 * math.log10(peak ** 2 / error)
