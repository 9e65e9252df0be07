"""What every pipeline takes (``PosterRequest``) and returns (``PosterResult``), and their checks.

A request holds arrays, not paths: the CLI loads and checks files (``runtime/images.py``); a
service builds requests from its own inputs. ``validate`` checks everything a user chooses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..contracts import DYNAMIC_DIMS
from ..errors import InputError
from ..images import MAX_IMAGE_PIXELS, check_category, check_texts

#: Denoising steps a user may ask for. 1 is RADM's default; past 200 no sampler here improves.
STEPS_RANGE = (1, 200)
#: Classifier-free guidance scale. 1 disables guidance (one UNet pass per step); past 30 SD
#: saturates colours to noise.
GUIDANCE_RANGE = (1.0, 30.0)
#: DeepCache's interval (1 = off): one full UNet step, then N-1 shallow steps on its cached deep
#: feature. Past 10 the cached feature is older than most of a short schedule.
CACHE_INTERVAL_RANGE = (1, 10)
SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "euler")
DEFAULT_SCHEDULER = "ddim"
DEFAULT_GUIDANCE = 7.5
#: Default canvas: the contracts' optimum size (the size TensorRT profiles are tuned for).
DEFAULT_SIZE = (DYNAMIC_DIMS["width"].opt, DYNAMIC_DIMS["height"].opt)
#: 2: ``elements`` became what was drawn (refined); the model's own boxes moved to ``proposed``.
LAYOUT_JSON_VERSION = 2


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768), checked against the contracts' height/width ranges."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise InputError(f"--size: got {text!r}, expected WIDTHxHEIGHT such as 512x512")
    size = int(match.group(1)), int(match.group(2))
    check_size(size)
    return size


def check_size(size: tuple[int, int]) -> None:
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
        raise InputError(f"--size: got {size!r}, expected (width, height) in pixels such as (512, 512)")
    for value, axis in zip(size, ("width", "height")):
        rng = DYNAMIC_DIMS[axis]
        if not rng.min <= value <= rng.max or value % rng.multiple_of:
            raise InputError(f"--size: {axis} {value} must be a multiple of {rng.multiple_of} in "
                             f"{rng.min}..{rng.max}, got {size[0]}x{size[1]}")


def _describe_array(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def check_pixels(array, field: str, channels: int) -> None:
    """An image given as an array (the Python API's form of --product/--style/--logo): uint8
    HxWxC, not empty, within the pixel limit the file loader applies."""
    kind = {3: "RGB", 4: "RGBA"}[channels]
    if not (isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 3
            and array.shape[2] == channels):
        raise InputError(f"{field}: expected an {kind} uint8 array HxWx{channels}, got {_describe_array(array)}")
    height, width = array.shape[:2]
    if height * width == 0:
        raise InputError(f"{field}: the image is {width}x{height} pixels; expected a non-empty image")
    if height * width > MAX_IMAGE_PIXELS:
        raise InputError(f"{field}: {width}x{height} = {width * height} pixels is over the limit of "
                         f"{MAX_IMAGE_PIXELS} (4096x4096); downscale it first")


@dataclass
class PosterRequest:
    product: np.ndarray  # RGB uint8 HxWx3, any size (fitted into the canvas)
    texts: list[str] = field(default_factory=list)
    product_mask: np.ndarray | None = None  # float32 HxW, 1 = product (from alpha or --mask)
    category: str = "product"
    style: np.ndarray | None = None  # RGB uint8 reference image for the personalized generator
    logo: np.ndarray | None = None  # RGBA uint8, pasted into logo boxes
    size: tuple[int, int] = DEFAULT_SIZE  # (width, height) of the poster
    steps: int | None = None  # generator steps (background / render); None: the bundle's default
    layout_steps: int | None = None  # RADM / PlanNet steps; None: the family config's default
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER
    cache_interval: int | None = None  # UNet feature cache (1 = off); None: the bundle's gated default
    refine: bool = True  # False (--no-refine): draw the layout model's boxes as proposed

    def validate(self) -> "PosterRequest":
        check_pixels(self.product, "product", channels=3)
        if self.product_mask is not None:
            mask = self.product_mask
            if not (isinstance(mask, np.ndarray) and mask.dtype.kind == "f" and mask.ndim == 2):
                raise InputError(f"product_mask: expected a float array HxW with 1 = product, got "
                                 f"{_describe_array(mask)}")
            if mask.shape != self.product.shape[:2]:
                raise InputError(f"product_mask: shape {mask.shape} does not match the product image "
                                 f"{self.product.shape[:2]}")
            if not np.isfinite(mask).all():
                raise InputError("product_mask: contains NaN or Inf; expected values in 0..1 (1 = product)")
            if mask.size and (mask.min() < 0 or mask.max() > 1):
                raise InputError(f"product_mask: values must be in 0..1 (1 = product), got min {mask.min():g} "
                                 f"max {mask.max():g}")
        if self.style is not None:
            check_pixels(self.style, "style", channels=3)
        if self.logo is not None:
            check_pixels(self.logo, "logo", channels=4)
        self.texts = check_texts(self.texts)
        check_size(self.size)
        for name, value in (("--steps", self.steps), ("--layout-steps", self.layout_steps)):
            if value is not None and (not isinstance(value, (int, np.integer)) or not STEPS_RANGE[0] <= value <= STEPS_RANGE[1]):
                raise InputError(f"{name}: got {value!r}, expected an integer in {STEPS_RANGE[0]}..{STEPS_RANGE[1]}")
        low, high = CACHE_INTERVAL_RANGE
        if self.cache_interval is not None and (not isinstance(self.cache_interval, (int, np.integer)) or
                                                isinstance(self.cache_interval, bool) or
                                                not low <= self.cache_interval <= high):
            raise InputError(f"--cache-interval: got {self.cache_interval!r}, expected an integer in {low}..{high} "
                             f"(1 = no feature caching)")
        if not (isinstance(self.guidance, (int, float, np.number)) and not isinstance(self.guidance, bool)
                and GUIDANCE_RANGE[0] <= float(self.guidance) <= GUIDANCE_RANGE[1]):
            raise InputError(f"--guidance: got {self.guidance!r}, expected a number in {GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"--scheduler: got {self.scheduler!r}, expected one of {', '.join(SCHEDULERS)}")
        if not (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool) and 0 <= self.seed < 2 ** 63):
            raise InputError(f"--seed: got {self.seed!r}, expected an integer in 0..2**63-1")
        self.category = check_category(self.category)
        if not isinstance(self.refine, (bool, np.bool_)):
            raise InputError(f"refine: got {self.refine!r}, expected True or False")
        return self


@dataclass
class LayoutElement:
    cls: str  # a class name of the layout model (logo, text, underlay, embellishment, product, ...)
    box: tuple[float, float, float, float]  # pixel x1, y1, x2, y2 on the poster
    score: float
    text: str | None = None  # the text line placed in this box (text boxes only)
    outcome: str | None = None  # proposed elements: what refinement did with it (layout_refine)
    reason: str | None = None  # proposed elements: why it was dropped or not drawn
    proposal: int | None = None  # drawn elements: index of the proposed element it comes from

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self) -> dict:
        out = {"class": self.cls, "box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4)}
        for key in ("text", "proposal", "outcome", "reason"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class PosterResult:
    image: np.ndarray  # RGB uint8 HxWx3: the poster (or the background / render alone)
    elements: list[LayoutElement]
    pipeline: str
    request: PosterRequest
    unplaced_texts: list[str] = field(default_factory=list)  # texts for which no text box was predicted
    timings: dict = field(default_factory=dict)  # stage -> seconds
    proposed: list[LayoutElement] = field(default_factory=list)  # the layout model's elements, with outcomes
    warnings: list[str] = field(default_factory=list)  # what the drawing lacked (e.g. a CJK font)

    @classmethod
    def composed(cls, composition, pipeline: str, request: PosterRequest, timings: dict) -> "PosterResult":
        """The result of a pipeline that drew a layout (``compose.Composition``)."""
        placement = composition.placement
        return cls(composition.image, placement.elements, pipeline, request, placement.unplaced_texts, timings,
                   placement.proposed, composition.warnings)

    def layout_json(self) -> dict:
        """The ``poster.json`` document; schema in docs/layout-json.md."""
        height, width = self.image.shape[:2]
        return {
            "format": "posterrt-layout", "version": LAYOUT_JSON_VERSION, "pipeline": self.pipeline,
            "width": width, "height": height, "seed": int(self.request.seed), "refined": bool(self.request.refine),
            "elements": [e.to_json() for e in self.elements],
            "proposed": [e.to_json() for e in self.proposed],
            "unplaced_texts": list(self.unplaced_texts),
            "warnings": list(self.warnings),
        }
