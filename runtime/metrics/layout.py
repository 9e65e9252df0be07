"""A generated layout as the metrics see it, and its loader for the layout JSON `posterrt generate` writes.

The JSON is ``{"image": {"width": W, "height": H, "path": "poster.png"}, "elements": [{"class":
"text", "box": [x1, y1, x2, y2], "score": 0.9, "text": "..."}, ...]}`` with boxes in pixels of the
W x H canvas; top-level ``"width"``/``"height"`` instead of ``"image"`` are accepted too. Unknown keys are ignored (the format may grow); missing or invalid required fields
raise an ``InputError`` naming the file and the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError

#: RADM predicts the first four; PlanNet also places the product.
LAYOUT_CLASSES = ("logo", "text", "underlay", "embellishment", "product")
LOGO = "logo"
TEXT = "text"
UNDERLAY = "underlay"
EMBELLISHMENT = "embellishment"
PRODUCT = "product"
#: Elements meant to sit under or around others; the papers leave them out of overlap.
DECORATIVE = (UNDERLAY, EMBELLISHMENT)


@dataclass(frozen=True)
class Layout:
    """Boxes (float64 [n, 4], pixel x1y1x2y2) and class names of one poster's elements."""

    width: int
    height: int
    boxes: np.ndarray
    classes: tuple[str, ...]
    scores: tuple[float | None, ...] = ()
    texts: tuple[str | None, ...] = ()
    image_path: str | None = None
    source: str = "<layout>"

    def __post_init__(self):
        assert self.boxes.shape == (len(self.classes), 4), (self.boxes.shape, len(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def where(self, *classes: str) -> np.ndarray:
        """Boolean mask over elements whose class is one of ``classes``."""
        return np.isin(np.asarray(self.classes, dtype=object), classes) if len(self) else np.zeros(0, bool)

    @property
    def graphic(self) -> np.ndarray:
        """Mask of the elements the metrics score: everything but the product, which enters the
        metrics only through saliency (it is content, not a graphic element the papers measure)."""
        return ~self.where(PRODUCT)


def _fail(source: str, field_name: str, value: Any, expected: str):
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise InputError(f"{source}: field {field_name!r} is {shown}, expected {expected}")


def _positive_int(value, source: str, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        _fail(source, field_name, value, "a positive integer (pixels)")
    return int(value)


def _box(value, source: str, field_name: str) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)):
        _fail(source, field_name, value, "[x1, y1, x2, y2]: four finite numbers in pixels")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x2 < x1 or y2 < y1:
        _fail(source, field_name, value, "x2 >= x1 and y2 >= y1 (corners in x1y1x2y2 order)")
    return [x1, y1, x2, y2]


def parse_layout(data: Mapping, source: str = "<layout>") -> Layout:
    """Check a decoded layout JSON object and turn it into a :class:`Layout`."""
    if not isinstance(data, Mapping):
        _fail(source, "<root>", type(data).__name__, "a JSON object with 'image' and 'elements'")
    # The canvas is either an "image" object (with the poster's path) or top-level width/height
    # (what PosterResult.layout_json writes; the poster PNG then shares the JSON's file stem).
    if "image" in data or "width" not in data:
        image, prefix = data.get("image"), "image."
        if not isinstance(image, Mapping):
            _fail(source, "image", image, "an object with 'width' and 'height' (or top-level 'width'/'height')")
    else:
        image, prefix = data, ""
    width = _positive_int(image.get("width"), source, f"{prefix}width")
    height = _positive_int(image.get("height"), source, f"{prefix}height")
    path = image.get("path") if prefix else None
    if path is not None and (not isinstance(path, str) or not path.strip()):
        _fail(source, "image.path", path, "a non-empty file name, or no 'path' key")
    elements = data.get("elements")
    if not isinstance(elements, list):
        _fail(source, "elements", elements, "a list of {'class', 'box'} objects (may be empty)")
    boxes, classes, scores, texts = [], [], [], []
    for index, element in enumerate(elements):
        where = f"elements[{index}]"
        if not isinstance(element, Mapping):
            _fail(source, where, element, "an object with 'class' and 'box'")
        name = element.get("class")
        if name not in LAYOUT_CLASSES:
            _fail(source, f"{where}.class", name, f"one of {', '.join(LAYOUT_CLASSES)}")
        boxes.append(_box(element.get("box"), source, f"{where}.box"))
        classes.append(name)
        score = element.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)):
            _fail(source, f"{where}.score", score, "a finite number or no 'score' key")
        scores.append(None if score is None else float(score))
        text = element.get("text")
        if text is not None and not isinstance(text, str):
            _fail(source, f"{where}.text", text, "a string or no 'text' key")
        texts.append(text)
    return Layout(width, height, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), tuple(classes),
                  tuple(scores), tuple(texts), path, source)


def load_layout(path: str | os.PathLike) -> Layout:
    """Read and check one layout JSON file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--layouts: file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}), expected a layout written by `posterrt generate`") from None
    return parse_layout(data, str(path))


def make_layout(width: int, height: int, elements: list[tuple[str, tuple[float, float, float, float]]]) -> Layout:
    """A layout from ``[(class, (x1, y1, x2, y2)), ...]``: for tests and for callers holding arrays."""
    data = {"image": {"width": width, "height": height},
            "elements": [{"class": name, "box": list(box)} for name, box in elements]}
    return parse_layout(data, "<make_layout>")
