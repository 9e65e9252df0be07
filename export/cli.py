"""`posterrt export`: arguments here, torch imported only when it runs."""
from __future__ import annotations

import json
from pathlib import Path

from posterrt.runtime.errors import InputError


def _pairs(values, flag):
    pairs = {}
    for value in values or []:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise InputError(f"{flag}: expected NAME=PATH, got {value!r}")
        pairs[key] = path
    return pairs


def add_arguments(parser):
    parser.add_argument("--preset", default="tiny", help="tiny (random tiny weights, seconds) or paper (the papers' sizes)")
    parser.add_argument("--models", help="comma-separated served models (default: all)")
    parser.add_argument("--checkpoint", action="extend", nargs="+", metavar="NAME=PATH",
                        help="weights for a family or model: radm=model_final.pth, plannet=plannet.safetensors, ...")
    parser.add_argument("--from-pretrained", action="extend", nargs="+", metavar="COMPONENT=PATH",
                        help="diffusers/transformers folders: unet=, controlnet=, vae=, text_encoder=, image_encoder=, tokenizer=")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write (or add models to)")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip the accuracy report (pipelines, ONNX Runtime against PyTorch) and its gate")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from .bundle_writer import Sources, export_bundle
    from .registry import check_preset, parse_models, with_weight_sharers

    preset = check_preset(args.preset)
    models = with_weight_sharers(parse_models(args.models))  # the list export_bundle writes
    sources = Sources(_pairs(args.checkpoint, "--checkpoint"), _pairs(args.from_pretrained, "--from-pretrained"))
    manifest = export_bundle(preset, models, args.out, sources, progress=not args.quiet, accuracy=not args.no_accuracy)
    for name in models:
        entry = manifest["models"][name]
        print(f"{name:18s} {entry['bytes'] / 1e6:9.1f} MB  parity max rel {entry['parity']['max_rel']:.1e} "
              f"(tol {entry['parity']['tolerance_rel']:.0e})  {entry['export_seconds']:.1f}s")
    _print_accuracy(args.out, ran=not args.no_accuracy)
    _print_tensorrt_ops(args.out)
    print(f"bundle: {args.out} ({manifest['export_seconds']}s)")
    return 0


def _print_accuracy(out: Path, ran: bool) -> None:
    from posterrt.runtime.accuracy import REPORT_FILE, summary_lines

    path = out / REPORT_FILE
    if ran and path.is_file():
        print("\n".join(summary_lines(json.loads(path.read_text()))))
        print(f"accuracy report: {path}")


def _print_tensorrt_ops(out: Path) -> None:
    from posterrt.engines.onnx_operators import REPORT_FILE

    path = out / REPORT_FILE
    print(f"{json.loads(path.read_text())['summary']}\nTensorRT operator report: {path}")
