"""Benchmark-style batches: the arrays a published method's evaluation reads, turned into layouts.

A batch is ``boxes`` ``[N, K, 4]`` (normalized left, top, right, bottom: 0..1 of the canvas) and
``classes`` ``[N, K]`` (or ``[N, K, 1]``, as PosterLayout's ``clses``) of integer ids, 0 marking an
empty slot; a class-id map (id -> posterrt class name); the canvas size; and optionally the ordered
image names (PosterLayout's ``test_order``), which find each layout's image and saliency maps.

Files: ``.npz`` (arrays ``boxes``, ``classes``, optional ``names`` and ``canvas`` ``[W, H]``),
``.npy`` (boxes; the classes come from their own file) or a JSON object with the same keys (plus
an optional ``class_map``; its lists may be ragged). Arrays are read with ``allow_pickle=False``:
a batch never runs code, so pickles (``.pt``, ``.pkl``, object arrays) are refused.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .layout import LAYOUT_CLASSES, Layout

#: The id of an empty slot in a padded batch (PosterLayout pads with class 0).
EMPTY_ID = 0
ARRAY_SUFFIXES = (".npy", ".npz")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")


@dataclass(frozen=True)
class Batch:
    layouts: list[Layout]
    names: list[str] | None  # the ordered image names, one per layout, if the batch had them


def is_batch_file(path: Path) -> bool:
    """A .npy / .npz file, a JSON object with ``boxes`` (a layout JSON has ``elements``), or a COCO
    results list (``[{"image_id", "bbox", "category_id", "score"}, ...]``, what RADM writes)."""
    if path.suffix.lower() in ARRAY_SUFFIXES + PICKLE_SUFFIXES:
        return True
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    head = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(head)
    except json.JSONDecodeError:
        return False
    return (isinstance(data, Mapping) and "boxes" in data) or (
        isinstance(data, list) and bool(data) and isinstance(data[0], Mapping) and "bbox" in data[0])


def parse_canvas(value, field: str = "--canvas") -> tuple[int, int]:
    """``"513x750"``, ``[513, 750]`` or ``(513, 750)`` -> (width, height)."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            value = [int(p) for p in parts]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) and v >= 1 for v in value)):
        return int(value[0]), int(value[1])
    raise InputError(f"{field}: got {value!r}, expected the canvas size as WIDTHxHEIGHT (e.g. 513x750) or [W, H]")


def parse_class_map(value, field: str = "--class-map") -> dict[int, str]:
    """``"1=text,2=logo,3=underlay"``, a JSON file holding ``{"1": "text", ...}``, or a mapping."""
    if isinstance(value, (str, os.PathLike)) and Path(value).suffix.lower() == ".json":
        path = Path(value)
        if not path.is_file():
            raise InputError(f"{field}: file {str(path)!r} does not exist")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(f"{field}: {str(path)!r} is not valid JSON ({error})") from None
    elif isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise InputError(f"{field}: got {value!r}, expected ID=CLASS pairs such as 1=text,2=logo,3=underlay")
        value = {key.strip(): name.strip() for key, name in pairs}
    if not isinstance(value, Mapping) or not value:
        raise InputError(f"{field}: got {value!r}, expected a non-empty map of class ids to class names")
    class_map = {}
    for key, name in value.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{field}: id {key!r} is not an integer") from None
        if class_id == EMPTY_ID:
            raise InputError(f"{field}: id 0 is the empty slot of a padded batch, expected ids of 1 or more")
        if name not in LAYOUT_CLASSES:
            raise InputError(f"{field}: id {class_id} maps to {name!r}, expected one of {', '.join(LAYOUT_CLASSES)}")
        class_map[class_id] = name
    return class_map


def _load_array(path: Path, field: str, key: str | None = None) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InputError(f"{field}: {str(path)!r} is a pickle ({suffix}); posterrt never unpickles input, save the "
                         f"arrays with numpy.save / numpy.savez (.npy/.npz) or as JSON")
    if not path.is_file():
        raise InputError(f"{field}: file {str(path)!r} does not exist")
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(f"{field}: {str(path)!r} is not valid JSON ({error})") from None
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's refusal of an object array, or a corrupt header
        raise InputError(f"{field}: {str(path)!r} holds no plain numeric array ({error}); posterrt never unpickles "
                         f"input") from None
    except OSError as error:
        raise InputError(f"{field}: {str(path)!r} is not a .npy/.npz file numpy can read ({error})") from None
    if suffix == ".npz":
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded


def read_names(path: str | os.PathLike, field: str = "--names") -> list[str]:
    """Image names, one per line of a text file, a JSON list, or a COCO annotation file's ``images``
    (their ``file_name`` in order: RADM's ``test.json``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field}: file {str(path)!r} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{field}: {str(path)!r} is a pickle; posterrt never unpickles input, expected a text "
                         f"file with one name per line or a JSON list")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return _names(json.loads(text), field)
        except json.JSONDecodeError as error:
            raise InputError(f"{field}: {str(path)!r} is not valid JSON ({error})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _names(value, field: str) -> list[str]:
    if isinstance(value, Mapping) and isinstance(value.get("images"), list):
        value = [image.get("file_name") if isinstance(image, Mapping) else None for image in value["images"]]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{field}: expected a list of image file names (non-empty strings), or a COCO file whose "
                         f"'images' each have a 'file_name'")
    return [v.strip() for v in value]


def _as_float_rows(value, field: str) -> list[np.ndarray]:
    """Per layout, a float array [K, 4] (keeping float32 input as float32, as the scripts compute)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 4 or value.dtype.kind not in "fiu":
            raise InputError(f"{field}: got a {value.dtype} array of shape {value.shape}, expected numbers [N, K, 4] "
                             f"(normalized left, top, right, bottom)")
        value = value if value.dtype in (np.float32, np.float64) else value.astype(np.float64)
        return list(value)
    if not isinstance(value, list):
        raise InputError(f"{field}: got {type(value).__name__}, expected a list of layouts of [l, t, r, b] boxes")
    rows = []
    for index, layout in enumerate(value):
        try:
            array = np.asarray(layout, dtype=np.float64).reshape(-1, 4) if layout != [] else np.zeros((0, 4))
        except (TypeError, ValueError):
            raise InputError(f"{field}[{index}]: expected a list of [l, t, r, b] boxes (4 numbers each)") from None
        rows.append(array)
    return rows


def _as_id_rows(value, field: str) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        if value.ndim == 3 and value.shape[2] == 1:
            value = value[..., 0]  # PosterLayout's clses are [N, K, 1]
        if value.ndim != 2 or value.dtype.kind not in "fiub":
            raise InputError(f"{field}: got a {value.dtype} array of shape {value.shape}, expected integer ids [N, K]")
        return list(value)
    if not isinstance(value, list):
        raise InputError(f"{field}: got {type(value).__name__}, expected a list of layouts of class ids")
    rows = []
    for index, layout in enumerate(value):
        try:
            rows.append(np.asarray(layout, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise InputError(f"{field}[{index}]: expected a list of integer class ids") from None
    return rows


def batch_layouts(boxes, classes, class_map: Mapping[int, str], canvas, names: Sequence[str] | None = None,
                  source: str = "batch") -> list[Layout]:
    """Layouts from normalized ltrb ``boxes`` [N, K, 4] and integer ``classes`` [N, K] (0 = empty slot).

    ``canvas`` is one (width, height) for the batch or one per layout. Pixel boxes are the normalized
    ones times the canvas size, computed in the input's float type (float32 input stays float32, as
    PosterLayout's evaluation multiplies its float32 array in place)."""
    box_rows = _as_float_rows(boxes, "boxes")
    id_rows = _as_id_rows(classes, "classes")
    if len(box_rows) != len(id_rows):
        raise InputError(f"classes: {len(id_rows)} layouts, expected one per layout of boxes ({len(box_rows)})")
    if names is not None and len(names) != len(box_rows):
        raise InputError(f"names: {len(names)} names, expected one per layout ({len(box_rows)})")
    canvases = [canvas] * len(box_rows) if canvas is None or isinstance(canvas[0], (int, np.integer)) else canvas
    if len(canvases) != len(box_rows):
        raise InputError(f"canvas: {len(canvases)} sizes, expected one for the batch or one per layout ({len(box_rows)})")
    layouts = []
    for index, (box_row, id_row) in enumerate(zip(box_rows, id_rows)):
        if len(box_row) != len(id_row):
            raise InputError(f"classes[{index}]: {len(id_row)} ids, expected one per box ({len(box_row)})")
        if canvases[index] is None:
            raise InputError(f"--canvas: no canvas size for layout {index} of {source}; give --canvas WIDTHxHEIGHT "
                             f"(or image names and --images, to take each image's size)")
        width, height = canvases[index]
        keep = id_row != EMPTY_ID
        for slot in np.flatnonzero(keep):
            _check_slot(box_row[slot], id_row[slot], class_map, index, int(slot))
        scale = np.asarray([width, height, width, height], dtype=box_row.dtype)
        pixels = (box_row[keep] * scale).astype(np.float64)
        classes_kept = tuple(class_map[int(i)] for i in id_row[keep])
        name = None if names is None else names[index]
        layouts.append(Layout(width, height, pixels.reshape(-1, 4), classes_kept, image_path=name,
                              source=f"{source}[{index}]"))
    return layouts


def _check_slot(box: np.ndarray, class_id, class_map: Mapping[int, str], index: int, slot: int) -> None:
    value = float(class_id)
    if not math.isfinite(value) or value != int(value) or int(value) not in class_map:
        known = ", ".join(f"{k}={v}" for k, v in sorted(class_map.items()))
        shown = int(value) if math.isfinite(value) and value == int(value) else value
        raise InputError(f"classes[{index}][{slot}]: id {shown} is not in the class map ({known}; 0 = empty "
                         f"slot); pass --class-map")
    if not np.all(np.isfinite(box)):
        raise InputError(f"boxes[{index}][{slot}]: {box.tolist()} is not 4 finite numbers")
    if box[2] < box[0] or box[3] < box[1]:
        raise InputError(f"boxes[{index}][{slot}]: {box.tolist()}, expected right >= left and bottom >= top "
                         f"(normalized ltrb)")


def _coco_number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{field}: got {value!r}, expected a finite number")
    return float(value)


def coco_layouts(results: list, class_map: Mapping[int, str], names: Sequence[str], canvases: Sequence,
                 source: str = "results") -> list[Layout]:
    """One layout per image from COCO-style predictions ``{"image_id", "bbox": [x, y, w, h] (pixels),
    "category_id", "score"}``. ``image_id`` is the image's position in ``names`` (RADM's script
    enumerates its test.json images); an image without predictions is an empty layout."""
    elements: list[list] = [[] for _ in names]
    for index, record in enumerate(results):
        where = f"{source}[{index}]"
        if not isinstance(record, Mapping):
            raise InputError(f"{where}: got {type(record).__name__}, expected an object with image_id, bbox, category_id")
        image_id = record.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < len(names):
            raise InputError(f"{where}.image_id: got {image_id!r}, expected the position of an image in --names "
                             f"(0..{len(names) - 1})")
        bbox = record.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InputError(f"{where}.bbox: got {bbox!r}, expected [x, y, w, h] in pixels")
        x, y, w, h = (_coco_number(v, f"{where}.bbox") for v in bbox)
        if w < 0 or h < 0:
            raise InputError(f"{where}.bbox: {bbox}, expected w >= 0 and h >= 0")
        category = record.get("category_id")
        if isinstance(category, bool) or not isinstance(category, int) or category not in class_map:
            known = ", ".join(f"{k}={v}" for k, v in sorted(class_map.items()))
            raise InputError(f"{where}.category_id: got {category!r}, expected an id of the class map ({known})")
        score = record.get("score")
        elements[image_id].append(([x, y, x + w, y + h], class_map[category],
                                   None if score is None else _coco_number(score, f"{where}.score")))
    layouts = []
    for index, (name, items) in enumerate(zip(names, elements)):
        if canvases[index] is None:
            raise InputError(f"--canvas: no canvas size for image {name!r}; give --canvas WIDTHxHEIGHT, a COCO "
                             f"--names file with width and height, or --images")
        width, height = canvases[index]
        boxes = np.asarray([box for box, _, _ in items], dtype=np.float64).reshape(-1, 4)
        layouts.append(Layout(width, height, boxes, tuple(c for _, c, _ in items), tuple(s for _, _, s in items),
                              image_path=name, source=f"{source} image {index}"))
    return layouts


def read_coco_sizes(path: str | os.PathLike) -> list[tuple[int, int]] | None:
    """The (width, height) of each image of a COCO annotation file, or None if it has none."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    images = data.get("images") if isinstance(data, Mapping) else None
    if not isinstance(images, list):
        return None
    try:
        return [parse_canvas([image["width"], image["height"]], f"{path.name}: images[{index}]")
                for index, image in enumerate(images)]
    except (KeyError, TypeError):
        return None


def read_batch(path: str | os.PathLike, default_class_map: Mapping[int, str], *, class_map=None, classes_path=None,
               names_path=None, canvas=None, default_canvas=None, image_size=None) -> Batch:
    """A batch from ``path`` (.npz, .npy with ``classes_path``, JSON, or COCO results with the
    images they index in ``names_path``).

    The class map is ``class_map``, else the file's ``class_map``, else ``default_class_map`` (the
    protocol's benchmark ids). The canvas is ``canvas``, else the file's, else ``default_canvas``,
    else ``image_size(name)`` of each layout's image."""
    path = Path(path)
    loaded = _load_array(path, "--layouts")
    if isinstance(loaded, list):  # COCO results (RADM's coco_instances_results.json)
        if names_path is None:
            raise InputError(f"--names: {str(path)!r} holds COCO results; give the images they index, in order "
                             f"(the COCO annotation file, e.g. RADM's test.json, or one name per line)")
        names = read_names(names_path)
        sizes = ([canvas] * len(names) if canvas else read_coco_sizes(names_path)
                 or [default_canvas or (image_size(name) if image_size else None) for name in names])
        return Batch(coco_layouts(loaded, dict(class_map or default_class_map), names, sizes, path.name), names)
    if isinstance(loaded, np.ndarray):  # a .npy holds the boxes only
        data = {"boxes": loaded}
    elif isinstance(loaded, Mapping):
        data = dict(loaded)
    else:
        raise InputError(f"--layouts: {str(path)!r} holds {type(loaded).__name__}, expected an object with 'boxes' "
                         f"and 'classes', or a list of COCO results")
    if "boxes" not in data:
        raise InputError(f"--layouts: {str(path)!r} has no 'boxes' (keys: {', '.join(sorted(data)) or 'none'}), "
                         f"expected normalized ltrb boxes [N, K, 4]")
    if classes_path is not None:
        data["classes"] = _load_array(Path(classes_path), "--classes")
    if "classes" not in data:
        raise InputError(f"--classes: {str(path)!r} has no 'classes'; give the class ids [N, K] with --classes FILE")
    if class_map is None:
        class_map = (parse_class_map(data["class_map"], f"{path.name}: class_map") if "class_map" in data
                     else dict(default_class_map))
    names = read_names(names_path) if names_path is not None else (
        _names(data["names"], f"{path.name}: names") if "names" in data else None)
    if canvas is None and "canvas" in data:
        canvas = parse_canvas(data["canvas"], f"{path.name}: canvas")
    canvas = canvas or default_canvas
    if canvas is None and image_size is not None and names is not None:
        canvas = [image_size(name) for name in names]
    return Batch(batch_layouts(data["boxes"], data["classes"], class_map, canvas, names, source=path.name), names)
