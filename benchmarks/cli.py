"""`posterrt bench`: per model, per stage, end to end and under concurrency; JSON + Markdown + PNG.

`posterrt bench perf-inputs --bundle DIR --out DIR` writes perf_analyzer input data instead.
"""
from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from posterrt.runtime.errors import InputError

ALL_BACKENDS = ("torch", "ort", "openvino", "http", "grpc")


def _csv(text: str, allowed=None, what="value") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise InputError(f"--{what}: unknown {bad}; expected a comma-separated subset of {', '.join(allowed)}")
    return items


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise InputError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"--{what}: values must be >= 1, got {text!r}")
    return values


def add_arguments(parser):
    parser.add_argument("action", nargs="?", default="run", choices=("run", "perf-inputs"),
                        help="run the benchmark (default) or write perf_analyzer input data")
    parser.add_argument("--preset", default="tiny", help="tiny or paper (selects the default bundle folder)")
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: bundles/<preset>, exported if absent)")
    parser.add_argument("--image-size", type=int, default=256, help="square image size in pixels (multiple of 64)")
    parser.add_argument("--backends", default="torch,ort,http,grpc", help=f"subset of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts for the throughput sweep")
    parser.add_argument("--models", help="served models for the per-model table (default: all in the bundle)")
    parser.add_argument("--pipelines", default="layout,background,render,poster", help="pipelines for the stage table")
    parser.add_argument("--skip", default="", help="sections to skip: models,stages,throughput")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and batch in the per-model table, after a warm-up (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps for the stage table")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown tables and PNG plots")


def run(args) -> int:
    from posterrt.runtime.bundle import Bundle

    if args.image_size % 64 or args.image_size < 64:
        raise InputError(f"--image-size: expected a multiple of 64, got {args.image_size}")
    bundle_dir = args.bundle or Path("bundles") / args.preset
    if not (bundle_dir / "manifest.json").exists():
        if args.bundle is not None:
            raise InputError(f"--bundle: {bundle_dir} holds no posterrt bundle (no manifest.json)")
        from posterrt.export.bundle_writer import export_bundle
        from posterrt.export.registry import check_preset, parse_models

        print(f"exporting the {args.preset} bundle to {bundle_dir} first", file=sys.stderr)
        export_bundle(check_preset(args.preset), parse_models(None), bundle_dir)
    bundle = Bundle(bundle_dir)

    if args.action == "perf-inputs":
        from .perf_inputs import write_perf_inputs

        written = write_perf_inputs(bundle, args.out, args.image_size)
        print(f"wrote {len(written)} perf_analyzer input files to {args.out}")
        return 0

    from . import machine
    from .report import write_report

    backends = _csv(args.backends, ALL_BACKENDS, "backends")
    skip = set(_csv(args.skip, ("models", "stages", "throughput"), "skip"))
    results = {"preset": bundle.preset, "image_size": args.image_size, "bundle": str(bundle_dir),
               "command": "posterrt bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"]
               else "posterrt bench (API)",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine.describe(), "notes": []}
    if "models" not in skip:
        from .models import bench_models

        models = _csv(args.models) if args.models else list(bundle.models)
        bundle.require(models)
        results["models"] = bench_models(bundle, models, args.image_size, [b for b in backends if b in ("torch", "ort", "openvino")],
                                         repeats=args.repeats, threads=args.threads)
    serving = [b for b in backends if b in ("http", "grpc")]
    if "stages" not in skip or ("throughput" not in skip and serving):
        from .serving import bench_serving

        bench_serving(results, bundle, args, serving, skip)
    paths = write_report(results, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
