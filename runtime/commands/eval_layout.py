"""`posterrt eval-layout`: layout quality metrics over a set of layout JSONs.

Prints one table row per metric (mean over the set, how many layouts it is defined on, which
direction is better) and writes the per-layout values and the means as JSON. Each layout's
image (and saliency map / product mask) is found in the given folder by the file name of the
JSON's image path, else by the layout's file stem (``poster_0.json`` -> ``poster_0.png``).
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..metrics.canvas import canvas_gray
from ..metrics.layout import Layout, load_layout
from ..metrics.report import METRICS, evaluate_layout, summarize
from ..metrics.saliency import resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser) -> None:
    parser.add_argument("--layouts", required=True, type=Path, help="a layout JSON, or a folder of them (*.json)")
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of the canvases the layouts were made for (readability reads their pixels)")
    parser.add_argument("--saliency", type=Path, help="folder of saliency maps (grayscale, 0..255), matched like images")
    parser.add_argument("--masks", type=Path,
                        help="folder of product masks (white = product): the saliency stand-in where no map is given")
    parser.add_argument("--out", required=True, type=Path, help="report JSON to write (per-layout values and means)")


def layout_files(path: Path, exclude: Path | None = None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"--layouts: {str(path)!r} does not exist, expected a layout JSON or a folder of them")
    files = sorted(p for p in path.glob("*.json") if exclude is None or p.resolve() != exclude.resolve())
    if not files:
        raise InputError(f"--layouts: folder {str(path)!r} holds no *.json file, expected layouts from `posterrt generate`")
    return files


def candidates(folder: Path, layout: Layout, layout_path: Path) -> list[Path]:
    """Files that may hold this layout's image (or map), in the order they are tried."""
    found = []
    if layout.image_path:
        named = Path(layout.image_path)
        if not named.is_absolute():
            found.append(folder / named)
        found.append(folder / named.name)
        found += [folder / f"{named.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    found += [folder / f"{layout_path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    return list(dict.fromkeys(found))  # keep order, drop repeats


def find_file(folder: Path | None, layout: Layout, layout_path: Path, flag: str) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise InputError(f"{flag}: {str(folder)!r} is not a folder")
    tried = candidates(folder, layout, layout_path)
    for path in tried:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in tried[:3]) + (", ..." if len(tried) > 3 else "")
    raise InputError(f"{flag}: no file for layout {str(layout_path)!r} in {str(folder)!r}; looked for {names}")


def evaluate_files(args) -> dict:
    per_layout, rows = [], []
    for layout_path in tqdm(layout_files(args.layouts, exclude=args.out), desc="layouts", unit="layout",
                            disable=None):
        layout = load_layout(layout_path)
        image = find_file(args.images, layout, layout_path, "--images")
        saliency_map = find_file(args.saliency, layout, layout_path, "--saliency")
        mask = find_file(args.masks, layout, layout_path, "--masks")
        salient = resolve(layout, saliency_map, mask, map_name=str(saliency_map or ""), mask_name=str(mask or ""))
        tallies = evaluate_layout(layout, canvas_gray(image, layout), salient.values)
        per_layout.append(tallies)
        rows.append({"layout": str(layout_path), "image": str(image), "saliency": salient.source,
                     "values": {name: tally.value for name, tally in tallies.items()}})
    totals = summarize(per_layout)
    n_layouts = {name: sum(1 for tallies in per_layout if tallies[name].count) for name in METRICS}
    return {
        "metrics": {name: {"better": info.better, "range": info.value_range, "needs": info.needs,
                           "mean_over": info.mean_over, "summary": info.summary} for name, info in METRICS.items()},
        "means": {name: totals[name].value for name in METRICS},
        "n": n_layouts,
        "layouts": rows,
    }


def format_table(report: dict) -> str:
    width = max(len(name) for name in METRICS)
    lines = [f"{'metric':<{width}}  {'better':<6}  {'mean':>10}  {'n':>5}"]
    for name, info in METRICS.items():
        mean = report["means"][name]
        shown = "-" if mean is None else f"{mean:.4f}"
        lines.append(f"{name:<{width}}  {info.better:<6}  {shown:>10}  {report['n'][name]:>5}")
    return "\n".join(lines)


def run(args) -> int:
    report = evaluate_files(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the metrics keep every value finite; a NaN would be our bug, not valid JSON.
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(format_table(report))
    print(f"{len(report['layouts'])} layouts; report: {args.out}")
    return 0
