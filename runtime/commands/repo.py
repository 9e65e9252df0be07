"""`posterrt repo build`: a Triton model repository from a bundle (see model_repository/README.md); `repo push`
and `repo reload` (an object-store repository rolled out to a fleet) live in commands/store.py."""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from . import store as store_commands
from ..triton.model_config import FLAVORS, GPU_ACCELERATORS, TRT_PRECISIONS


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,4, got {text!r}") from None


def _served(model) -> str:
    """`` (variant int8, sha256 0123456789ab..., onnxruntime)`` for a model that serves a variant."""
    variant = model.variant
    return f"  (variant {variant['name']}, sha256 {variant['sha256'][:12]}..., {variant['engine']})" if variant else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="write <out>/<model>/config.pbtxt and <out>/<model>/1/ for a bundle")
    build.add_argument("--bundle", required=True, help="bundle folder written by `posterrt export`")
    build.add_argument("--flavor", choices=FLAVORS, default="cpu",
                       help="cpu: Python backend running ONNX Runtime (default); gpu-onnx: onnxruntime_onnx "
                            "platform; gpu-trt: tensorrt_plan platform with plans from --engines")
    build.add_argument("--out", default="model_repository", help="repository folder (default: model_repository)")
    build.add_argument("--models", help="comma-separated models (default: every model of the bundle)")
    build.add_argument("--engines", help="folder of TensorRT plans from `posterrt engines build` (gpu-trt)")
    build.add_argument("--variants", metavar="MODEL=VARIANT,...|none",
                       help="cpu flavor: serve these optimized variants from `posterrt engines optimize` instead of "
                            "the exported fp32 files, e.g. bg_unet=openvino-bf16,render_unet=int8 (ONNX variants run "
                            "on ONNX Runtime, openvino-* on OpenVINO, which must be installed in the server's Python); "
                            "every listed model must be written by this build; `none`: the exported fp32 files "
                            "(default: the fastest gated variant of each model for THIS machine's CPU kind, so build "
                            "on the kind of CPU that will serve, or name them)")
    batching = build.add_mutually_exclusive_group()
    batching.add_argument("--dynamic-batching", dest="dynamic_batching", action="store_true", default=None,
                          help="force dynamic batching on for every model (default: on for step and prologue models)")
    batching.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                          help="force dynamic batching off for every model")
    build.add_argument("--queue-delay-us", type=int, help="max_queue_delay_microseconds (default: 0)")
    build.add_argument("--preferred-batch-sizes", type=_int_list, default=(), help="e.g. 2,4 (default: none)")
    build.add_argument("--instances", type=int, default=None,
                       help="instances of every model (default: 1, and 2 for radm_head and plannet_denoiser on "
                            "the cpu flavor)")
    build.add_argument("--model-instances", default=None, metavar="MODEL=N,...",
                       help="per-model instance counts over --instances, e.g. radm_head=2,bg_unet=1")
    build.add_argument("--intra-op-threads", type=int, default=1, help="cpu flavor: ONNX Runtime (or OpenVINO) threads per instance (default 1)")
    build.add_argument("--model-threads", default=None, metavar="MODEL=N,...",
                       help="cpu flavor: per-model threads over --intra-op-threads, e.g. bg_unet=2,radm_head=2")
    build.add_argument("--inter-op-threads", type=int, default=1, help="cpu flavor: ONNX Runtime inter-op threads (default 1)")
    build.add_argument("--accelerator", choices=GPU_ACCELERATORS, default="tensorrt",
                       help="gpu-onnx: TensorRT execution provider (default) or CUDA only")
    build.add_argument("--precision", choices=[p.lower() for p in TRT_PRECISIONS], default="fp16",
                       help="gpu-onnx with TensorRT: precision_mode (default fp16)")
    build.add_argument("--max-request-mb", type=float, default=None,
                       help="cpu flavor: refuse requests whose tensors exceed this many MB (default: the largest "
                            "request the model's contract allows)")
    build.add_argument("--no-server-loops", dest="server_loops", action="store_false",
                       help="cpu flavor: leave out the sampling loops that run in the server (plannet_sampler, "
                            "bg_unet_sampler, render_unet_sampler, radm_layout); clients then call the step models "
                            "once per step")
    build.add_argument("--unet-loop-call", choices=("auto", "in-process", "bls"), default="auto",
                       help="how <unet>_sampler runs its UNet: in its own stub (a second copy of the weights) or "
                            "through BLS calls to the served UNet (default auto: in-process up to 1 GB of weights)")
    build.add_argument("--client-bundle", help="also write the client's half of the bundle (manifest + tokenizers) here")
    store_commands.add_arguments(sub)


def _model_counts(text: str | None, flag: str) -> dict[str, int]:
    """``radm_head=2,bg_unet=1`` -> {model: count}."""
    from ..contracts import parse_model_values

    counts = {}
    for model, value in parse_model_values(text, flag, "N", "radm_head=2").items():
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"{flag}: {model}={value!r}, expected a whole number >= 1")
        counts[model] = int(value)
    return counts


def run(args: argparse.Namespace) -> int:
    if args.action == "push":
        return store_commands.run_push(args)
    if args.action == "reload":
        return store_commands.run_reload(args)
    return build(args)


def build(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..cpu_variants import choose_variants
    from ..triton.model_config import ServingOptions
    from ..server_stages import SERVER_STAGES
    from ..server_stages.unet import MODEL_CALL_PARAMETER as UNET_CALL_PARAMETER
    from ..triton.repository import build_repository, served_models, write_client_bundle

    if args.engines and args.flavor != "gpu-trt":
        raise InputError(f"--engines: only the gpu-trt flavor uses TensorRT plans, got --flavor {args.flavor}")
    bundle = Bundle(args.bundle)
    models = None
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        loops = list(SERVER_STAGES)
        unknown = [m for m in models if m not in bundle.models and m not in loops]
        if unknown:
            raise InputError(f"--models: {unknown} are not in bundle {bundle.root}; it has {', '.join(bundle.models)} "
                             f"(and the server-side loops {', '.join(loops)})")
    extra = {} if args.unet_loop_call == "auto" else {UNET_CALL_PARAMETER: args.unet_loop_call}
    options = ServingOptions(
        flavor=args.flavor, dynamic_batching=args.dynamic_batching, max_queue_delay_us=args.queue_delay_us,
        preferred_batch_sizes=args.preferred_batch_sizes, instances=args.instances,
        model_instances=_model_counts(args.model_instances, "--model-instances"),
        model_threads=_model_counts(args.model_threads, "--model-threads"),
        intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads,
        gpu_accelerator=args.accelerator, trt_precision=args.precision,
        max_request_bytes=None if args.max_request_mb is None else int(args.max_request_mb * 1e6),
        server_loops=args.server_loops, extra_parameters=extra)
    choice = None
    if args.flavor == "cpu" or args.variants is not None:  # the GPU flavors refuse explicit variants
        served = served_models(bundle, options, models)
        choice = choose_variants(bundle, args.variants, models=served,
                                 onnx_only=[model for model, onnx_only in served.items() if onnx_only])
    report = build_repository(bundle, args.out, options, models=models, engines=args.engines,
                              variants=choice.variants if choice else None)
    if choice:
        print(choice.line())
    for model in report.models:
        print(f"{model.name:20s} {'ok' if model.ready else 'PLAN MISSING'}  {model.folder}{_served(model)}")
        if model.note:
            print(f"  {model.note}", file=sys.stderr)
    for loop in report.server_loops:  # serving-only models: the server stages (plannet_sampler, <unet>_sampler, ...)
        how = f", {loop.note}" if loop.note else ""
        print(f"{loop.name:20s} ok  {loop.folder}  (server stage{how}){_served(loop)}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.client_bundle:
        print(f"client bundle: {write_client_bundle(bundle, args.client_bundle)}")
    print(f"repository {report.root} ({report.flavor}): {len(report.models)} models; "
          f"serve it with `posterrt serve --repo {report.root}`")
    return 1 if report.missing_plans else 0
