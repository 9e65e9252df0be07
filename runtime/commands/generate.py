"""`posterrt generate`: product image + texts -> poster PNG and its layout JSON (``<out>.json``).

Every argument is checked before any model loads, and each mistake is reported as one line
naming the argument (exit code 2). Numbers are parsed here rather than by argparse so that a
bad value gets the same one-line error as every other bad input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from ..images import check_out_folder, load_product, load_rgb, load_rgba
from ..pipelines import PIPELINES, needs_product_mask
from ..pipelines.request import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, SCHEDULERS, PosterRequest, parse_size

#: Where `posterrt demo` puts the tiny bundle, and where `generate` looks when --bundle is not given.
BUNDLE_ENV = "POSTERRT_BUNDLE"


def default_bundle_dir() -> Path:
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "posterrt" / "bundles" / "tiny"


def add_arguments(parser) -> None:
    parser.add_argument("--product", required=True, help="product image; its alpha channel is the cutout unless --mask is given")
    parser.add_argument("--mask", help="cutout mask, same size as --product (white = product)")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a poster text line (repeat for more lines, first = headline; at most 20)")
    parser.add_argument("--category", default="product", help="product category for the background prompt (e.g. shoes)")
    parser.add_argument("--style", help="style reference image for the personalized background")
    parser.add_argument("--logo", help="logo image placed in the layout's logo boxes")
    parser.add_argument("--pipeline", default="poster", choices=list(PIPELINES),
                        help="poster (background + RADM layout + text), layout (RADM on the product image), "
                             "background (background only), render (PlanNet + RenderNet)")
    parser.add_argument("--size", default=None, help="poster size WIDTHxHEIGHT, multiples of 64 in 256..1024 (default 512x512)")
    parser.add_argument("--steps", help="generator denoising steps, 1..200 (default: the bundle's)")
    parser.add_argument("--layout-steps", help="layout sampler steps, 1..200 (default: the layout model's config)")
    parser.add_argument("--guidance", default=str(DEFAULT_GUIDANCE), help=f"classifier-free guidance scale, 1..30 (1 = off; default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--seed", default="0", help="random seed; the same seed and inputs give the same poster (default 0)")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"sampler: {', '.join(SCHEDULERS)} (default {DEFAULT_SCHEDULER})")
    parser.add_argument("--cache-interval", help="UNet feature cache: one full step then N-1 shallow steps, "
                                                 "1..10 (1 = off; default: the bundle's gated default, else 1)")
    parser.add_argument("--bundle", type=Path, default=None, help=f"exported bundle folder (default: ${BUNDLE_ENV} or "
                                                                  f"{default_bundle_dir()})")
    parser.add_argument("--backend", default=None, metavar="URL",
                        help="Triton server URL(s), http://HOST:8000 or grpc://HOST:8001, comma-separated for "
                             "several; default: embedded ONNX Runtime")
    parser.add_argument("--threads", default=None, help="ONNX Runtime intra-op threads (default: one per core)")
    parser.add_argument("--variants", default=None, metavar="MODEL=VARIANT,...|none",
                        help="embedded backend: run these models' gated variants from `posterrt engines optimize` "
                             "(e.g. bg_unet=openvino-bf16,render_unet=openvino-bf16), or `none` for the exported "
                             "fp32 files (default: the fastest gated variant of each model for this CPU's kind; "
                             "`posterrt engines variants` shows it)")
    parser.add_argument("--no-refine", action="store_true",
                        help="draw the layout model's boxes as proposed, without refinement (texts may then overlap "
                             "each other or the product; for studying the model)")
    parser.add_argument("--timeout", default=None, help="seconds the whole request may take (default: no limit); "
                                                         "past it the request stops at its next step")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, type=Path,
                        help="poster PNG to write; the layout JSON goes beside it (a missing last folder is created)")


def parse_int(value, flag: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InputError(f"{flag}: got {value!r}, expected an integer in {low}..{high}") from None
    if not low <= number <= high:
        raise InputError(f"{flag}: got {number}, expected an integer in {low}..{high}")
    return number


def parse_float(value, flag: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise InputError(f"{flag}: got {value!r}, expected a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InputError(f"{flag}: got {value!r}, expected a finite number")
    return number


def check_out(out: Path) -> Path:
    if out.suffix.lower() != ".png":
        raise InputError(f"--out: {str(out)!r} must end in .png (posters are written as PNG)")
    if out.exists() and out.is_dir():
        raise InputError(f"--out: {str(out)!r} is a folder, expected a file name such as poster.png")
    return check_out_folder(out)


def build_request(args) -> PosterRequest:
    """Load and check every input file and value of the command line."""
    from ..pipelines.request import CACHE_INTERVAL_RANGE, DEFAULT_SIZE, STEPS_RANGE

    check_out(args.out)
    product, mask = load_product(args.product, args.mask, require_mask=needs_product_mask(args.pipeline))
    request = PosterRequest(
        product=product, product_mask=mask, texts=args.text, category=args.category,
        style=load_rgb(args.style, "--style") if args.style else None,
        logo=load_rgba(args.logo, "--logo") if args.logo else None,
        size=parse_size(args.size) if args.size else DEFAULT_SIZE,
        steps=parse_int(args.steps, "--steps", *STEPS_RANGE),
        layout_steps=parse_int(args.layout_steps, "--layout-steps", *STEPS_RANGE),
        guidance=parse_float(args.guidance, "--guidance"),
        seed=parse_int(args.seed, "--seed", 0, 2 ** 63 - 1),
        scheduler=args.scheduler, refine=not args.no_refine,
        cache_interval=parse_int(args.cache_interval, "--cache-interval", *CACHE_INTERVAL_RANGE),
    )
    return request.validate()


def make_backend(bundle, url: str | None, threads: int | None, variants: str | None = None):
    """Embedded ONNX Runtime by default, with ``variants`` (the --variants text) chosen by
    ``cpu_variants.choose_variants`` and said in one line; Triton server(s) when --backend names
    http:// or grpc:// URLs."""
    from ..backends import EMBEDDED, open_backend
    from ..cpu_variants import choose_variants

    if url in EMBEDDED:
        choice = choose_variants(bundle, variants)
        backend = open_backend(bundle, url, intra_op_threads=threads, variants=choice.variants)
        print(choice.line(), flush=True)  # after the backend accepted them (an unknown variant fails first)
        return backend
    if threads is not None:
        raise InputError(f"--threads: sets ONNX Runtime's thread pool and has no effect with --backend {url!r}")
    if variants is not None:
        raise InputError(f"--variants: chooses the models the embedded backend loads; with --backend {url!r} the "
                         f"server serves what its repository holds (`posterrt repo build --variants`)")
    return open_backend(bundle, url)


def write_outputs(result, out: Path) -> tuple[Path, Path]:
    from ..images import save_png

    poster = save_png(result.image, out)
    layout = out.with_suffix(".json")
    layout.write_text(json.dumps(result.layout_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return poster, layout


class StageBars:
    """One progress bar per stage (plan, layout, background, render), drawn from the request's
    progress events: the same on the embedded backend and through a Triton server stage."""

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, event) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="step", leave=False)
        bar.update(event.step - bar.n)
        if event.step == event.total:
            bar.refresh()  # a fast stage ends within tqdm's redraw interval: show it complete

    def __enter__(self) -> "StageBars":
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


def run(args) -> int:
    from ..bundle import Bundle
    from ..pipelines import build_pipeline
    from ..progress import RunControl, controlled

    request = build_request(args)
    timeout = None if args.timeout is None else parse_float(args.timeout, "--timeout")
    if timeout is not None and timeout <= 0:
        raise InputError(f"--timeout: got {args.timeout!r}, expected a positive number of seconds")
    threads = parse_int(args.threads, "--threads", 1, 256)
    if args.bundle is None and not default_bundle_dir().is_dir():
        raise InputError(f"--bundle: not given, and no bundle at the default {default_bundle_dir()}; run "
                         f"`posterrt demo` once to build the tiny one there, or pass --bundle DIR")
    bundle = Bundle(args.bundle or default_bundle_dir())
    with make_backend(bundle, args.backend, threads, args.variants) as backend, StageBars() as bars:
        pipeline = build_pipeline(args.pipeline, backend, progress=not args.quiet)
        # Ctrl-C stops the request where it is: a server stage's stream is cancelled on the way out
        with controlled(RunControl(None if args.quiet else bars, timeout=timeout)):
            result = pipeline(request)
    poster, layout = write_outputs(result, args.out)
    print(f"poster: {poster}")
    print(f"layout: {layout}")
    if result.unplaced_texts:
        print(f"note: the layout has fewer text boxes than texts; not placed: {result.unplaced_texts}")
    return 0
