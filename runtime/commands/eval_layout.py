"""`posterrt eval-layout`: layout quality metrics over a set of layouts.

The layouts are posterrt's layout JSONs (a file or a folder of them) or a benchmark-style batch
(normalized ltrb boxes and class ids as .npz / .npy / JSON, see runtime/metrics/batch.py).
``--protocol`` picks the definitions: ``posterrt`` (corrected, the default), ``posterlayout`` or
``radm`` (the benchmark scripts' computations). Prints one table row per metric (mean over the
set, how many layouts it is defined on, which direction is better) and writes the per-layout values
and the means as JSON. Each layout's image (and saliency maps / product mask) is found in the given
folder by the file name of the layout's image (a batch's image name), else by the layout's file
stem (``poster_0.json`` -> ``poster_0.png``); a PFPN saliency map may carry ``_pred`` before the
suffix, as PosterLayout names them.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..images import open_image
from ..metrics.batch import is_batch_file, parse_canvas, parse_class_map, read_batch
from ..metrics.layout import Layout, load_layout
from ..metrics.protocols import DEFAULT_PROTOCOL, PROTOCOLS, Fields, Protocol, protocol_named
from ..metrics.report import summarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser) -> None:
    parser.add_argument("--layouts", required=True, type=Path,
                        help="a layout JSON or a folder of them, or a benchmark-style batch (.npz, .npy, or a JSON "
                             "with 'boxes' and 'classes')")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL,
                        help=f"which definitions: {', '.join(PROTOCOLS)} (default {DEFAULT_PROTOCOL}; the others "
                             f"reproduce the benchmark scripts, see docs/metrics.md)")
    parser.add_argument("--classes", type=Path, help="batch: class ids [N, K] (.npy or JSON), 0 = empty slot")
    parser.add_argument("--class-map", help="batch: ID=CLASS pairs (1=text,2=logo,3=underlay) or a JSON file; "
                                            "default: the protocol's benchmark ids")
    parser.add_argument("--canvas", help="batch: canvas WIDTHxHEIGHT of the normalized boxes (default: the "
                                         "batch's, else 513x750 under posterlayout, else each image's size)")
    parser.add_argument("--names", type=Path,
                        help="batch: image names in layout order (text, one per line, or a JSON list)")
    parser.add_argument("--images", type=Path,
                        help="folder of the canvases the layouts were made for (readability reads their pixels)")
    parser.add_argument("--saliency", type=Path, action="append",
                        help="folder of saliency maps (grayscale, 0..255), matched like images; repeat it for "
                             "several detectors (their element-wise max is used, as PosterLayout does)")
    parser.add_argument("--masks", type=Path,
                        help="folder of product masks (white = product): the saliency stand-in where no map is given")
    parser.add_argument("--out", required=True, type=Path, help="report JSON to write (per-layout values and means)")


def layout_files(path: Path, exclude: Path | None = None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"--layouts: {str(path)!r} does not exist, expected a layout JSON, a folder of them or a "
                         f"batch file")
    files = sorted(p for p in path.glob("*.json") if exclude is None or p.resolve() != exclude.resolve())
    if not files:
        raise InputError(f"--layouts: folder {str(path)!r} holds no *.json file, expected layouts from `posterrt generate`")
    return files


def candidates(folder: Path, layout: Layout, layout_path: Path | None) -> list[Path]:
    """Files that may hold this layout's image (or map), in the order they are tried."""
    found = []
    if layout.image_path:
        named = Path(layout.image_path)
        if not named.is_absolute():
            found.append(folder / named)
        found.append(folder / named.name)
        found.append(folder / named.name.replace(".", "_pred."))  # PosterLayout's PFPN maps
        found += [folder / f"{named.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    if layout_path is not None:
        found += [folder / f"{layout_path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    return list(dict.fromkeys(found))  # keep order, drop repeats


def find_file(folder: Path | None, layout: Layout, layout_path: Path | None, flag: str) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise InputError(f"{flag}: {str(folder)!r} is not a folder")
    tried = candidates(folder, layout, layout_path)
    for path in tried:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in tried[:3]) + (", ..." if len(tried) > 3 else "")
    raise InputError(f"{flag}: no file for layout {str(layout_path or layout.source)!r} in {str(folder)!r}; looked for {names}")


def _image_size(folder: Path | None):
    """For a batch without a canvas size: each layout's canvas is its image's size."""
    def size(name: str) -> tuple[int, int]:
        if folder is None:
            raise InputError("--canvas: the batch has no canvas size; give --canvas WIDTHxHEIGHT or --images")
        with open_image(folder / name, "--images") as image:
            return image.size
    return size


def read_layouts(args, protocol: Protocol) -> list[tuple[Layout, Path | None]]:
    """The layouts to score, each with the file it came from (None for a batch's layouts)."""
    batch_flags = [flag for flag, value in (("--classes", args.classes), ("--class-map", args.class_map),
                                            ("--canvas", args.canvas), ("--names", args.names)) if value is not None]
    if not (args.layouts.is_file() and is_batch_file(args.layouts)):
        if batch_flags:
            raise InputError(f"{batch_flags[0]}: only for a benchmark-style batch, but --layouts "
                             f"{str(args.layouts)!r} holds layout JSONs")
        return [(load_layout(path), path) for path in layout_files(args.layouts, exclude=args.out)]
    canvas = None if args.canvas is None else parse_canvas(args.canvas)
    class_map = None if args.class_map is None else parse_class_map(args.class_map)
    batch = read_batch(args.layouts, protocol.class_ids, class_map=class_map, classes_path=args.classes,
                       names_path=args.names, canvas=canvas, image_size=_image_size(args.images),
                       default_canvas=(513, 750) if protocol.name == "posterlayout" else None)
    if batch.names is None and (args.images or args.saliency or args.masks):
        raise InputError("--names: the batch has no image names, so its images and maps cannot be found; give "
                         "--names FILE (one name per line, in layout order)")
    return [(layout, None) for layout in batch.layouts]


def evaluate_files(args) -> dict:
    protocol = protocol_named(args.protocol)
    protocol.check_masks(args.masks is not None, Fields())
    per_layout, rows = [], []
    for layout, layout_path in tqdm(read_layouts(args, protocol), desc="layouts", unit="layout", disable=None):
        image = find_file(args.images, layout, layout_path, "--images")
        maps = [find_file(folder, layout, layout_path, "--saliency") for folder in args.saliency or ()]
        mask = find_file(args.masks, layout, layout_path, "--masks")
        evaluation = protocol.evaluate(layout, image, maps, mask, Fields())
        per_layout.append(evaluation.tallies)
        rows.append({"layout": str(layout_path or layout.source), "image": None if image is None else str(image),
                     "saliency": evaluation.saliency,
                     "values": {name: tally.value for name, tally in evaluation.tallies.items()}})
    totals = summarize(per_layout, protocol.metrics)
    n_layouts = {name: sum(1 for tallies in per_layout if tallies[name].count) for name in protocol.metrics}
    return {
        "protocol": {"name": protocol.name, "summary": protocol.summary},
        "metrics": {name: {"better": info.better, "range": info.value_range, "needs": info.needs,
                           "mean_over": info.mean_over, "summary": info.summary}
                    for name, info in protocol.metrics.items()},
        "means": protocol.set_means(totals),
        "n": n_layouts,
        "layouts": rows,
    }


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  {'better':<6}  {'mean':>10}  {'n':>5}"]
    for name, info in metrics.items():
        mean = report["means"][name]
        shown = "-" if mean is None else f"{mean:.4f}"
        lines.append(f"{name:<{width}}  {info['better']:<6}  {shown:>10}  {report['n'][name]:>5}")
    return "\n".join(lines)


def run(args) -> int:
    report = evaluate_files(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the metrics keep every value finite; a NaN would be our bug, not valid JSON.
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(format_table(report))
    print(f"{len(report['layouts'])} layouts, protocol {report['protocol']['name']}; report: {args.out}")
    return 0
