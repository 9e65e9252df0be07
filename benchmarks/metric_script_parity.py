"""The script protocols against the benchmark scripts themselves: a manual check, since it runs
third-party code that posterrt neither ships nor runs in CI (the tests hold hand-computed cases).

    python -m posterrt.benchmarks.metric_script_parity --posterlayout-repo DIR --radm-repo DIR

The folders are checkouts of PKU-ICST-MIPL/PosterLayout-CVPR2023 and liuan0803/RADM. The scripts
import cv2 and torch, so both must be importable (``pip install opencv-python-headless``); RADM's
unused torchvision and matplotlib imports are stubbed when missing.

1. PosterLayout's published output (``output/boxes.pt``, ``output/clses.pt``: numpy arrays in
   torch.save zips, read by walking the pickle's opcodes, nothing unpickled) through the
   posterlayout protocol, against ``output/results.txt``.
2. The first ``--layouts`` of those layouts on generated canvases and saliency maps (other sizes,
   PFPN's ``_pred`` names, a flat canvas): eval.py's functions and the protocol on the same files.
3. The same layouts as RADM's COCO results (with embellishments and a duplicate record): the
   functions of RADM's metrics.py and the radm protocol.

Prints each metric's two values and their relative difference; exits 1 if one exceeds --tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pickletools
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.metrics import layout_metrics, read_batch
from ..runtime.metrics.protocols import PROTOCOLS

CANVAS = (513, 750)  # eval.py's
SIZES = [(513, 750), (400, 600), (520, 760), (350, 520)]  # the generated canvases cycle through these


def array_from_torch_save(path: Path) -> np.ndarray:
    """The numpy array a torch.save zip holds, from the pickle's opcodes (shape, dtype, raw bytes)."""
    with zipfile.ZipFile(path) as archive:  # the folder inside is named after the file when it was saved
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    opcodes = list(pickletools.genops(pickled))
    dtype = next(arg for op, arg, _ in opcodes if op.name.endswith("UNICODE") and arg in ("f4", "f8", "i8", "i4"))
    data = max((arg for op, arg, _ in opcodes if isinstance(arg, (str, bytes))), key=len)
    data = data.encode("latin1") if isinstance(data, str) else data
    ints, shape = [], None
    for op, arg, _ in opcodes:  # the shape tuple is the last run of ints before the dtype
        if op.name.startswith("BININT"):
            ints.append(arg)
        elif op.name.startswith("TUPLE") and len(ints) >= 2 and shape is None and op.name != "TUPLE1":
            count = {"TUPLE2": 2, "TUPLE3": 3}.get(op.name, len(ints) - 1)
            shape = tuple(ints[-count:])
    array = np.frombuffer(data, dtype="<" + dtype)
    if shape is None or array.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: could not read an array from the pickle opcodes (shape {shape}, {array.size} values)")
    return array.reshape(shape)


@contextlib.contextmanager
def inside(folder: str):
    """Run in ``folder`` (eval.py reads ``Dataset/test/...`` relative to the working directory)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stub_missing(*packages: str) -> None:
    """Empty stand-ins for packages a script imports but never uses here (and their submodules)."""
    for package in packages:
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for name in (package, f"{package}.models", f"{package}.pyplot"):
            module = types.ModuleType(name)
            module.__getattr__ = lambda attribute: None
            sys.modules[name] = module


def make_dataset(root: Path, count: int, seed: int) -> list[str]:
    """Canvases (a sharp noisy band on smooth noise; one flat) and two saliency folders, as eval.py reads them."""
    rng = np.random.default_rng(seed)
    folders = {key: root / "Dataset" / "test" / key for key in ("image_canvas", "saliencymaps_pfpn", "saliencymaps_basnet")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    names = []
    for index in range(count):
        name = f"{index}.png"
        width, height = SIZES[index % len(SIZES)]
        smooth = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
        canvas = np.asarray(smooth.resize((width, height), Image.Resampling.BILINEAR)).copy()
        canvas[height // 3:height // 3 + 20] = rng.integers(0, 256, (20, width, 3))
        if index == 7:
            canvas[:] = 128
        Image.fromarray(canvas).save(folders["image_canvas"] / name)
        Image.fromarray((rng.random((height // 2, width // 2)) ** 3 * 255).astype(np.uint8)).save(
            folders["saliencymaps_pfpn"] / name.replace(".", "_pred."))
        yy, xx = np.mgrid[0:height, 0:width]
        blob = 255 * np.exp(-(((xx - width / 2) / (width / 5)) ** 2 + ((yy - height * 0.6) / (height / 5)) ** 2))
        Image.fromarray(blob.astype(np.uint8)).save(folders["saliencymaps_basnet"] / name)
        names.append(name)
    return names


def compare(rows: list, label: str, script: float, ours: float) -> None:
    difference = abs(ours - script) / max(abs(script), 1e-300)
    rows.append((label, script, ours, difference))


def posterlayout_rows(repo: Path, count: int, seed: int) -> list:
    rows = []
    boxes, classes = array_from_torch_save(repo / "output" / "boxes.pt"), array_from_torch_save(repo / "output" / "clses.pt")
    published = dict(line.split(": ") for line in (repo / "output" / "results.txt").read_text().splitlines() if ": " in line)
    keys = {"metrics_val": "validity", "metrics_ove": "overlap", "metrics_ali": "alignment",
            "metrics_und_l": "underlay_loose", "metrics_und_s": "underlay_strict"}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "b.npz", boxes=boxes, classes=classes)
        layouts = read_batch(Path(tmp) / "b.npz", PROTOCOLS["posterlayout"].class_ids, canvas=CANVAS).layouts
    means = layout_metrics(layouts, protocol="posterlayout")
    for key, name in keys.items():
        compare(rows, f"results.txt {name}", float(published[key]), means[f"posterlayout.{name}"])

    script = load_module("posterlayout_eval", repo / "eval.py")
    with tempfile.TemporaryDirectory() as tmp, inside(tmp):
        names = make_dataset(Path(tmp), count, seed)
        subset_boxes, subset_classes = boxes[:count].copy(), classes[:count].copy()
        np.savez("b.npz", boxes=subset_boxes, classes=subset_classes, names=np.asarray(names))
        layouts = read_batch("b.npz", PROTOCOLS["posterlayout"].class_ids, canvas=CANVAS).layouts
        test = Path("Dataset/test")
        means = layout_metrics(layouts, images=[test / "image_canvas" / n for n in names],
                               saliency=[[test / "saliencymaps_pfpn" / n.replace(".", "_pred."),
                                          test / "saliencymaps_basnet" / n] for n in names], protocol="posterlayout")
        subset_boxes[:, :, ::2] *= CANVAS[0]
        subset_boxes[:, :, 1::2] *= CANVAS[1]
        results = {"validity": script.metrics_val(CANVAS, subset_classes, subset_boxes)}
        subset_classes = script.getRidOfInvalid(CANVAS, subset_classes, subset_boxes)
        for name, function in (("overlap", script.metrics_ove), ("alignment", script.metrics_ali),
                               ("underlay_loose", script.metrics_und_l), ("underlay_strict", script.metrics_und_s)):
            results[name] = function(subset_classes, subset_boxes)
        with np.errstate(all="ignore"):
            for name, function in (("utility", script.metrics_uti), ("occlusion", script.metrics_occ),
                                   ("readability", script.metrics_rea)):
                results[name] = function(names, subset_classes, subset_boxes)
        for name, value in results.items():
            compare(rows, f"eval.py {name}", float(value), means[f"posterlayout.{name}"])
    return rows


def radm_rows(repo: Path, posterlayout_repo: Path, count: int, seed: int) -> list:
    stub_missing("torchvision", "matplotlib")
    script = load_module("radm_metrics", repo / "metrics.py")
    boxes = array_from_torch_save(posterlayout_repo / "output" / "boxes.pt")[:count]
    classes = array_from_torch_save(posterlayout_repo / "output" / "clses.pt")[:count, :, 0].copy()
    classes[3][classes[3] == 2] = 4  # some embellishments (RADM's id 4)
    classes[9 % count][classes[9 % count] == 2] = 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp, inside(tmp):
        names = make_dataset(Path(tmp), count, seed)
        folder = Path("Dataset/test/image_canvas")
        images, results = [], []
        for index, name in enumerate(names):
            width, height = Image.open(folder / name).size
            images.append({"file_name": name, "id": index, "width": width, "height": height})
            scale = np.asarray([width, height, width, height], np.float32)
            for slot in np.flatnonzero(classes[index]):
                x1, y1, x2, y2 = (boxes[index, slot] * scale).astype(np.float64).tolist()
                results.append({"image_id": index, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "category_id": int(classes[index, slot]), "score": 0.5})
        results.append(dict(results[0]))  # an exact duplicate record
        Path("test.json").write_text(json.dumps({"images": images}))
        Path("results.json").write_text(json.dumps(results))
        layouts = read_batch("results.json", PROTOCOLS["radm"].class_ids, names_path="test.json").layouts
        means = layout_metrics(layouts, images=[folder / n for n in names], protocol="radm")
        grouped: dict = {}
        for record in results:
            grouped.setdefault(record["image_id"], []).append(record)
        grouped = list(grouped.values())
        id_to_name = {index: image["file_name"] for index, image in enumerate(images)}
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # its tqdm bars
            values = {"R_ove": script.cal_R_ove(grouped), "R_und": script.cal_R_und(grouped),
                      "R_ali": script.cal_R_ali(grouped, id_to_name, str(folder)),
                      "occupancy": script.cal_R_occ(grouped, id_to_name),
                      "R_com": script.cal_R_com(grouped, id_to_name, str(folder))}
        for name, value in values.items():
            compare(rows, f"metrics.py {name}", float(value), means[f"radm.{name}"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posterlayout-repo", type=Path, required=True, help="checkout of PKU-ICST-MIPL/PosterLayout-CVPR2023")
    parser.add_argument("--radm-repo", type=Path, required=True, help="checkout of liuan0803/RADM")
    parser.add_argument("--layouts", type=int, default=40, help="layouts in the generated checks (at least 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest relative difference accepted")
    args = parser.parse_args(argv)
    rows = posterlayout_rows(args.posterlayout_repo, args.layouts, args.seed)
    rows += radm_rows(args.radm_repo, args.posterlayout_repo, args.layouts, args.seed)
    print(f"{'check':<34} {'script':>22} {'posterrt':>22} {'rel. diff':>10}")
    for label, script, ours, difference in rows:
        print(f"{label:<34} {script!r:>22} {ours!r:>22} {difference:>10.1e}")
    worst = max(difference for *_, difference in rows)
    print(f"largest relative difference {worst:.1e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
