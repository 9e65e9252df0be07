"""`posterrt demo`: a poster from the product image posterrt ships, on a fresh machine.

If the bundle folder holds no bundle yet, the tiny preset of all twelve models is exported into it
first (random weights, a minute on a laptop). That export is the one place the runtime side
triggers the torch export code, and it is imported only then: with a bundle at hand the demo
runs without torch.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .generate import default_bundle_dir, parse_int, write_outputs

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PRODUCT = ASSETS / "product.png"  # drawn by scripts/make_demo_assets.py: a juice bottle with an alpha cutout
LOGO = ASSETS / "logo.png"
TEXTS = ["Fresh Orange Juice", "100% pressed, no sugar added", "Buy 2 get 1 free"]
CATEGORY = "juice"


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"bundle folder; the tiny bundle is exported there if absent (default {default_bundle_dir()})")
    parser.add_argument("--out", type=Path, default=Path("posterrt-demo"), help="folder for poster.png and poster.json (created if its parent exists)")
    parser.add_argument("--seed", default="0", help="random seed (default 0)")
    parser.add_argument("--size", default=None, help="poster size WIDTHxHEIGHT (default 512x512)")
    parser.add_argument("--no-refine", action="store_true",
                        help="draw the layout model's boxes as proposed, without refinement")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def ensure_bundle(folder: Path, progress: bool) -> Path:
    """Export the tiny bundle into ``folder`` unless a bundle with every model is already there."""
    from ..bundle import MANIFEST, Bundle
    from ..contracts import MODEL_NAMES

    if folder.exists() and not folder.is_dir():
        raise InputError(f"--bundle: {folder} is a file; expected a bundle folder (or a new folder to export into)")
    if (folder / MANIFEST).is_file():
        bundle = Bundle(folder)  # refuses another contract version with its own message
        missing = [m for m in MODEL_NAMES if m not in bundle.models]
        if not missing:
            return folder
        if bundle.preset != "tiny":
            raise InputError(f"--bundle: {folder} (preset {bundle.preset!r}) lacks models {missing}; export them "
                             f"with `posterrt export --preset {bundle.preset} --models {','.join(missing)} --out {folder}`")
    try:
        from posterrt.export.bundle_writer import export_bundle
    except ModuleNotFoundError as error:
        raise InputError(f"--bundle: no bundle at {folder}, and building one needs {error.name!r}: install "
                         f"posterrt[export] (PyTorch), or pass --bundle DIR with an exported bundle") from None
    print(f"exporting the tiny bundle to {folder} (once) ...")
    export_bundle("tiny", list(MODEL_NAMES), folder, progress=progress)
    return folder


def run(args) -> int:
    from ..backends.onnxruntime import OrtBackend
    from ..bundle import Bundle
    from ..images import check_out_folder, load_product, load_rgba
    from ..pipelines import build_pipeline
    from ..pipelines.request import DEFAULT_SIZE, PosterRequest, parse_size

    check_out_folder(args.out / "poster.png")  # before the minute-long export
    size = parse_size(args.size) if args.size else DEFAULT_SIZE
    seed = parse_int(args.seed, "--seed", 0, 2 ** 63 - 1)
    folder = ensure_bundle(args.bundle or default_bundle_dir(), progress=not args.quiet)
    product, mask = load_product(PRODUCT)
    request = PosterRequest(product=product, product_mask=mask, texts=list(TEXTS), category=CATEGORY,
                            logo=load_rgba(LOGO, "logo"), size=size, seed=seed,
                            refine=not args.no_refine).validate()
    with OrtBackend(Bundle(folder)) as backend:
        result = build_pipeline("poster", backend, progress=not args.quiet)(request)
    args.out.mkdir(exist_ok=True)
    poster, layout = write_outputs(result, args.out / "poster.png")
    print(f"poster: {poster.resolve()}")
    print(f"layout: {layout.resolve()}")
    print("timings: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items()))
    if Bundle(folder).preset == "tiny":
        print("note: the tiny bundle holds random weights, so the background is noise and the layout may hold "
              "no confident boxes; export real checkpoints (`posterrt export --preset paper --checkpoint ...`) "
              "for real posters")
    if result.unplaced_texts:
        print(f"note: texts without a text box in this layout: {result.unplaced_texts}")
    return 0
