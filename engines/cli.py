"""`posterrt engines {build,clean,refit,show,optimize,variants,cache-interval}`: arguments here; TensorRT is imported only by build/refit."""
from __future__ import annotations

import json
from pathlib import Path

from posterrt.runtime.contracts import MODEL_NAMES, parse_model_list
from posterrt.runtime.cpu_variants import CPU_KINDS
from posterrt.runtime.errors import ParityError

from .ort_optimize import VARIANTS as CPU_VARIANTS
from .precision import PRECISIONS


def _models(text: str | None) -> list[str]:
    return parse_model_list(text)


def _refittable(text: str) -> tuple:
    return () if text.strip().lower() == "none" else tuple(_models(text))


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="build TensorRT plans from a bundle (needs an NVIDIA GPU and TensorRT)")
    build.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `posterrt export`")
    build.add_argument("--out", required=True, type=Path, help="engines folder (plans, build logs, manifest.json)")
    build.add_argument("--precision", default="fp16", choices=PRECISIONS,
                       help="fp16 (default; overflow-prone layers stay fp32 in a strongly typed network), bf16 or fp32")
    build.add_argument("--shapes", help="narrow profile ranges: height=512:768:1024,cfg_batch=2:2:4 (NAME=SIZE fixes one)")
    build.add_argument("--models", help="comma-separated served models (default: every model in the bundle)")
    build.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5 (default 3)")
    build.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace memory pool in GiB (default 8)")
    build.add_argument("--timing-cache", type=Path, help="timing cache file, read and updated (default OUT/timing.cache)")
    build.add_argument("--refittable", default=",".join(("bg_unet",)),
                       help="models built with REFIT, comma-separated, or 'none' (default bg_unet)")
    build.add_argument("--clean-tool", default="auto", choices=("auto", "onnxslim", "onnxruntime"),
                       help="ONNX clean-up before the build (default auto: onnxslim if installed, else onnxruntime)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    clean = sub.add_parser("clean", help="clean a bundle's ONNX for TensorRT / ONNX Runtime GPU and check parity (CPU)")
    clean.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `posterrt export`")
    clean.add_argument("--out", required=True, type=Path, help="folder for <model>.onnx and clean.json")
    clean.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="precision policy: fp16/bf16 keep overflow-prone layers fp32 (default fp32: nothing marked)")
    clean.add_argument("--models", help="comma-separated served models (default: every model in the bundle)")
    clean.add_argument("--clean-tool", default="auto", choices=("auto", "onnxslim", "onnxruntime"),
                       help="ONNX clean-up tool (default auto: onnxslim if installed, else onnxruntime)")

    refit = sub.add_parser("refit", help="put new weights (an adapter / LoRA merged and exported) into a refittable plan")
    refit.add_argument("--engine", required=True, type=Path, help="the plan, e.g. ENGINES/bg_unet.plan")
    refit.add_argument("--onnx", required=True, type=Path, help="the model exported again with the new weights")

    show = sub.add_parser("show", help="list the engines of a folder and whether they fit this machine")
    show.add_argument("--engines", required=True, type=Path, help="engines folder written by `posterrt engines build`")

    optimize = sub.add_parser("optimize", help="write a gated CPU variant (ONNX Runtime fp32-opt, int8, int8-dynamic; OpenVINO fp32, bf16, int8, int8-bf16) of models into the bundle")
    optimize.add_argument("--bundle", required=True, type=Path,
                          help="bundle folder written by `posterrt export`; the variants are added to it")
    optimize.add_argument("--variant", required=True, choices=CPU_VARIANTS,
                          help="the variant to build and gate (docs/engines.md compares them)")
    optimize.add_argument("--models", default="bg_unet,render_unet",
                          help="comma-separated (default bg_unet,render_unet); a UNet brings its feature-cache steps "
                               "(<unet>_deep, <unet>_shallow) when the bundle has them; naming one of those builds "
                               "the pair alone")
    optimize.add_argument("--out", type=Path, help="also write the build and gate reports there as optimize-VARIANT.json")

    variants = sub.add_parser("variants", help="this CPU's kind (from its flags), a bundle's CPU variants and the one "
                                                "posterrt runs by default for each model")
    variants.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `posterrt export`")
    variants.add_argument("--cpu", choices=[kind.name for kind in CPU_KINDS],
                          help="show the picks for this CPU kind instead of this machine's")

    cache = sub.add_parser("cache-interval", help="make a UNet feature-cache interval the bundle's default, if cached "
                                                  "output passes the gate against uncached output")
    cache.add_argument("--bundle", required=True, type=Path,
                       help="bundle folder written by `posterrt export`; the passing interval is recorded in it")
    # 4: the smallest interval at which both paper UNets' loops run >= 1.8x faster than uncached
    # (benchmarks/RESULTS.md, "Issue 18 at paper size"); the gate still decides per bundle.
    cache.add_argument("--interval", type=int, default=4,
                       help="full UNet step every N steps, 2..10 (default 4, the measured choice)")
    cache.add_argument("--pipelines", default="background,render", help="comma-separated (default background,render)")
    cache.add_argument("--cases", type=int, default=2, help="fixed requests per pipeline (default 2)")
    cache.add_argument("--size", type=int, default=256, help="square image size of the requests (default 256)")
    cache.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")


def run(args) -> int:
    return {"build": _build, "clean": _clean, "refit": _refit, "show": _show, "optimize": _optimize,
            "variants": _variants, "cache-interval": _cache_interval}[args.action](args)


def _build(args) -> int:
    from .build import BuildOptions, build_engines
    from posterrt.runtime.profiles import parse_shapes

    options = BuildOptions(precision=args.precision, opt_level=args.opt_level, workspace_gb=args.workspace_gb,
                           timing_cache=args.timing_cache, refittable=_refittable(args.refittable),
                           shapes=parse_shapes(args.shapes), clean_tool=args.clean_tool)
    models = _models(args.models) if args.models else None  # None: every model of the bundle
    manifest = build_engines(args.bundle, args.out, models, options, progress=not args.quiet)
    for name in models or [m for m in MODEL_NAMES if m in manifest["engines"]]:
        entry = manifest["engines"][name]
        print(f"{name:18s} {entry['precision']}  {entry['build_seconds']:7.1f}s  {args.out / entry['plan']}")
    return 0


def _clean(args) -> int:
    from posterrt.runtime.bundle import Bundle

    from .cleanup import CLEAN_RTOL, FP16_RTOL, compare_onnx, prepare_onnx

    bundle = Bundle(args.bundle)
    models = _models(args.models) if args.models else [m for m in MODEL_NAMES if m in bundle.models]
    bundle.require(models)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in models:
        source, target = bundle.model_path(name), args.out / f"{name}.onnx"
        report = prepare_onnx(source, target, model_name=name, precision=args.precision, tool=args.clean_tool)
        if args.precision == "bf16":
            report["parity"] = "not run: ONNX Runtime has no bf16 kernels for these opset-17 ops (TensorRT only)"
            parity_text = "parity not run (bf16)"
        else:
            rtol = CLEAN_RTOL if args.precision == "fp32" else FP16_RTOL
            report["parity"] = compare_onnx(source, target, bundle.contract(name), rtol=rtol)
            if not report["parity"]["passed"]:
                target.unlink()
                raise ParityError(f"{name}: the cleaned {args.precision} ONNX differs from the bundle's by "
                                  f"{report['parity']['max_rel']:.2e} relative (tolerance {rtol:.0e}); seed {report['parity']['seed']}")
            parity_text = f"parity max rel {report['parity']['max_rel']:.1e} (tol {rtol:.0e})"
        reports[name] = report
        print(f"{name:18s} nodes {report['nodes_before']:5d} -> {report['nodes_after']:5d}  {parity_text}")
    (args.out / "clean.json").write_text(json.dumps(reports, indent=2, sort_keys=True))
    return 0


def _refit(args) -> int:
    from .refit import refit_engine

    entry = refit_engine(args.engine, args.onnx)
    last = entry["refits"][-1]
    print(f"{entry['model']}: refitted {last['weights']} weights from {args.onnx} in {last['seconds']}s")
    return 0


def _show(args) -> int:
    from .build import TensorRTMissing, import_tensorrt
    from .manifest import EngineError, check_engine_compatible, current_gpu, read_manifest

    manifest = read_manifest(args.engines)
    try:
        here = (current_gpu(), import_tensorrt().__version__)
    except (TensorRTMissing, EngineError):
        here = None
    for name, entry in sorted(manifest["engines"].items()):
        status = "cannot check here (no TensorRT or GPU)"
        if here is not None:
            try:
                check_engine_compatible(entry, *here)
                status = "fits this machine"
            except EngineError as error:
                status = str(error)
        print(f"{name:18s} {entry['precision']:5s} TensorRT {entry['tensorrt_version']}  {entry['gpu']['name']} "
              f"(sm {entry['gpu']['compute_capability']})  refits {len(entry['refits'])}  {status}")
    return 0


def _optimize(args) -> int:
    from .ort_optimize import optimize_bundle

    entries = optimize_bundle(args.bundle, args.variant, _models(args.models))
    for name, entry in entries.items():
        figures = entry["gate"]["figures"]
        psnr = figures.get("image_psnr_db", figures.get("latent_psnr_db"))
        cached = entry.get("cached_loop_gate", {}).get("figures", {})
        print(f"{name:18s} {args.variant}  {entry['bytes'] / 1e6:8.1f} MB  noise rel RMS {figures['noise_rel_rms']:.1e}"
              + (f"  PSNR {psnr:.1f} dB" if psnr is not None else "")
              + (f"  cached loop (interval {cached['cache_interval']}) PSNR {cached['image_psnr_db']:.1f} dB"
                 if "image_psnr_db" in cached else "") + f"  {args.bundle / entry['file']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"optimize-{args.variant}.json").write_text(json.dumps(entries, indent=2, sort_keys=True))
    return 0


def _variants(args) -> int:
    from posterrt.runtime.bundle import Bundle
    from posterrt.runtime.cpu_variants import cpu_flags, cpu_kind, default_variants, detect_cpu
    from posterrt.runtime.families import cached_step_of

    bundle = Bundle(args.bundle)
    flags = cpu_flags()
    here = detect_cpu(flags)
    cpu = cpu_kind(args.cpu) if args.cpu else here
    seen = ", ".join(sorted(flags & {flag for kind in CPU_KINDS for flag in kind.needs})) or "none of them"
    print(f"this CPU: kind {here.name} (flags posterrt reads: {seen})")
    print(f"{'picks for' if args.cpu else 'order of'} kind {cpu.name}: {' > '.join(cpu.order)} ({cpu.basis}"
          + (f"; benchmarks/RESULTS.md: {' > '.join(cpu.results_sections)}" if cpu.results_sections else "") + ")")
    picks = default_variants(bundle, cpu)
    for model in bundle.models:
        registered = bundle.variants(model)
        if not registered:
            continue
        unet = cached_step_of(model)  # a cached step runs its UNet's pick
        pick = picks.get(unet or model, "none (exported fp32)") + (f" (as {unet})" if unet else "")
        states = [f"{variant} ({_variant_state(bundle, model, variant, cpu)})" for variant in sorted(registered)]
        print(f"{model:18s} default {pick:20s} registered: {', '.join(states)}")
    if not any(bundle.variants(model) for model in bundle.models):
        print(f"bundle {bundle.root} has no CPU variants: every model runs its exported fp32 file "
              f"(build them with `posterrt engines optimize`)")
    return 0


def _variant_state(bundle, model: str, variant: str, cpu) -> str:
    from posterrt.runtime.cpu_variants import why_not

    reason = why_not(bundle, model, variant)
    if reason:
        return reason
    return "gated" if variant in cpu.order else f"gated; never a default on kind {cpu.name}"


def _cache_interval(args) -> int:
    from posterrt.runtime.accuracy import summary_lines

    from .cache_interval import report_path, set_default_interval

    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    report = set_default_interval(args.bundle, args.interval, pipelines, cases=args.cases, image_size=args.size,
                                  steps=args.steps, progress=True)
    print("\n".join(summary_lines(report)))
    print(f"cache interval {args.interval} is now the default of {', '.join(report['pipelines'])} "
          f"(report {report_path(args.bundle, args.interval)})")
    return 0
