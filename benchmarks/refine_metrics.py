"""Layout metrics of the raw and the refined layout over many seeds (docs/metrics.md, "Refinement").

For each seed the canvas and the layout model's proposals are made once; the raw layout
(``--no-refine``) and the refined one are composed from the same proposals, so the two differ only
by refinement. Written per seed: ``raw/<seed>.json``, ``refined/<seed>.json`` (layout JSONs),
``canvas/<seed>.png`` (the canvas without texts: readability reads it) and ``masks/<seed>.png`` (the
product on the canvas: the saliency stand-in). Then ``posterrt eval-layout`` scores both folders:

    python -m posterrt.benchmarks.refine_metrics --bundle bundles/tiny --seeds 50 --out out/refine
    posterrt eval-layout --layouts out/refine/refined --images out/refine/canvas --masks out/refine/masks \\
        --out out/refine/refined_report.json

``--pipeline poster`` paints the background (the demo); ``layout`` lays out on the product fitted to
a white canvas (RADM alone: what a paper-size bundle of the three RADM models can run).
``--recompose`` skips the models: it composes again from the canvases, masks and proposals an
earlier run wrote into ``--out`` (proposal boxes as the JSON rounds them, to 0.01 px), to measure a
change of the refinement alone.
``--score-threshold`` replaces RADM's 0.25: the paper preset's random weights score every box
near 0.01 (their class prior), so at 0.25 their layouts are empty and there is nothing to refine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.cli import main as posterrt
from posterrt.runtime.commands import demo
from posterrt.runtime.compose import compose
from posterrt.runtime.images import fit_to_canvas, flatten, load_product, load_rgba
from posterrt.runtime.pipelines.layout import RADMLayout
from posterrt.runtime.pipelines.request import LayoutElement, PosterRequest, PosterResult
from posterrt.runtime.schedulers.radm import RadmBoxSampler

#: The metrics the comparison is about (issue 19): lower overlap and occlusion, higher underlay
#: effectiveness, readability no worse.
HEADLINE = ("posterlayout.overlap", "radm.R_ove", "posterlayout.occlusion", "posterlayout.underlay_loose",
            "posterlayout.underlay_strict", "radm.R_und", "posterlayout.readability", "radm.R_com",
            "posterlayout.utility", "posterlayout.validity")


def canvas_and_proposals(pipeline: str, request: PosterRequest, layout: RADMLayout, background=None):
    """(canvas RGB, product mask on the canvas, the layout model's elements) for one request."""
    if pipeline == "poster":
        canvas, mask = fit_to_canvas(request.product, request.product_mask, request.size)
        canvas = background.generate(canvas, mask, request)
    else:
        canvas, mask = fit_to_canvas(flatten(request.product, request.product_mask), request.product_mask,
                                     request.size)
    return canvas, mask, layout(canvas, request.texts, request.seed, request.layout_steps)


def write_seed(out: Path, seed: int, pipeline: str, canvas, mask, proposals, request: PosterRequest, logo) -> None:
    Image.fromarray(canvas).save(out / "canvas" / f"{seed}.png")
    Image.fromarray((mask * 255).round().astype(np.uint8)).save(out / "masks" / f"{seed}.png")
    for name, refine in (("raw", False), ("refined", True)):
        composition = compose(canvas, proposals, request.texts, logo, mask, refine)
        result = PosterResult.composed(composition, pipeline, PosterRequest(**{**vars(request), "refine": refine}), {})
        (out / name / f"{seed}.json").write_text(json.dumps(result.layout_json(), ensure_ascii=False), encoding="utf-8")
        Image.fromarray(composition.image).save(out / name / f"{seed}.png")


def evaluate(out: Path) -> dict:
    """``posterrt eval-layout`` over both folders (the command itself); the reports go beside them."""
    reports = {}
    for name in ("raw", "refined"):
        report = out / f"{name}_report.json"
        print(f"{name}:")
        code = posterrt(["eval-layout", "--layouts", str(out / name), "--images", str(out / "canvas"),
                         "--masks", str(out / "masks"), "--out", str(report)])
        if code:
            raise SystemExit(code)
        reports[name] = json.loads(report.read_text(encoding="utf-8"))
    return reports


def counts(folder: Path) -> dict[str, float]:
    """Per layout, mean over the folder: text lines placed (of all given) and elements drawn, by class."""
    layouts = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    placed = sum(sum(1 for e in d["elements"] if "text" in e) for d in layouts)
    given = sum(sum(1 for e in d["elements"] if "text" in e) + len(d["unplaced_texts"]) for d in layouts)
    out = {"text lines placed / given": placed / max(1, given)}
    for cls in ("text", "underlay", "logo"):
        out[f"{cls} elements drawn per poster"] = sum(
            sum(1 for e in d["elements"] if e["class"] == cls) for d in layouts) / max(1, len(layouts))
    return out


def markdown(reports: dict, out: Path) -> str:
    lines = ["| metric | better | raw | refined | n (raw / refined) |", "|---|---|---|---|---|"]
    for name in HEADLINE:
        better = reports["raw"]["metrics"][name]["better"]
        cells = [reports[side]["means"][name] for side in ("raw", "refined")]
        shown = ["-" if v is None else f"{v:.4f}" for v in cells]
        lines.append(f"| `{name}` | {better} | {shown[0]} | {shown[1]} | "
                     f"{reports['raw']['n'][name]} / {reports['refined']['n'][name]} |")
    raw, refined = counts(out / "raw"), counts(out / "refined")
    n = len(reports["raw"]["layouts"])
    lines += [f"| {name} | | {raw[name]:.2f} | {refined[name]:.2f} | {n} / {n} |" for name in raw]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.refine_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle folder (poster: every model; layout: RADM's three)")
    parser.add_argument("--pipeline", default="poster", choices=("poster", "layout"), help="how the canvas is made")
    parser.add_argument("--seeds", type=int, default=50, help="seeds 0..N-1 (default 50)")
    parser.add_argument("--size", type=int, default=512, help="square poster size in pixels (default 512)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="RADM's score threshold instead of the model config's (random weights: 0)")
    parser.add_argument("--recompose", action="store_true",
                        help="reuse the canvases, masks and proposals already in --out (no model runs)")
    parser.add_argument("--out", type=Path, required=True, help="folder for layouts, canvases, masks and reports")
    args = parser.parse_args(argv)
    if args.bundle is None and not args.recompose:
        parser.error("--bundle is required unless --recompose")
    for name in ("raw", "refined", "canvas", "masks"):
        (args.out / name).mkdir(parents=True, exist_ok=True)
    product, mask = load_product(demo.PRODUCT)
    logo = load_rgba(demo.LOGO, "logo")
    if args.recompose:
        for seed in tqdm(range(args.seeds), desc="seeds", unit="seed"):
            recompose(args.out, seed, product, mask, logo)
    else:
        run_models(args, product, mask, logo)
    reports = evaluate(args.out)
    table = markdown(reports, args.out)
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def recompose(out: Path, seed: int, product, mask, logo) -> None:
    canvas = np.asarray(Image.open(out / "canvas" / f"{seed}.png").convert("RGB"))
    canvas_mask = np.asarray(Image.open(out / "masks" / f"{seed}.png"), dtype=np.float32) / 255.0
    earlier = json.loads((out / "raw" / f"{seed}.json").read_text(encoding="utf-8"))
    proposals = [LayoutElement(p["class"], tuple(p["box"]), p["score"]) for p in earlier["proposed"]]
    request = PosterRequest(product=product, product_mask=mask, texts=list(demo.TEXTS), category=demo.CATEGORY,
                            logo=logo, size=(canvas.shape[1], canvas.shape[0]), seed=seed).validate()
    write_seed(out, seed, earlier["pipeline"], canvas, canvas_mask, proposals, request, logo)


def run_models(args, product, mask, logo) -> None:
    with OrtBackend(Bundle(args.bundle)) as backend:
        layout = RADMLayout(backend)
        if args.score_threshold is not None:
            layout.sampler = RadmBoxSampler(dataclasses.replace(layout.sampler.config, score_threshold=args.score_threshold))
        background = None
        if args.pipeline == "poster":
            from posterrt.runtime.pipelines.background import BackgroundPipeline

            background = BackgroundPipeline(backend, progress=False)
        for seed in tqdm(range(args.seeds), desc="seeds", unit="seed"):
            request = PosterRequest(product=product, product_mask=mask, texts=list(demo.TEXTS), category=demo.CATEGORY,
                                    logo=logo, size=(args.size, args.size), seed=seed).validate()
            canvas, canvas_mask, proposals = canvas_and_proposals(args.pipeline, request, layout, background)
            write_seed(args.out, seed, args.pipeline, canvas, canvas_mask, proposals, request, logo)


if __name__ == "__main__":
    sys.exit(main())
