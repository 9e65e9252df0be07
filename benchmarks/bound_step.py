"""One UNet-class step as the embedded backend's sampling loop makes it: ``OrtBackend.bind`` (the
step-invariant inputs bound once through ONNX Runtime's IO binding) against ``OrtBackend.run`` with
every input, interleaved in one process with one session (``unet_step`` compares engines; several
sessions there share the two cores' spinning thread pools, this measures the loop's own call).

    python -m posterrt.benchmarks.bound_step --bundle /work/bundles/paper --model bg_unet --variant int8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle

from .timing import interleaved
from .unet_step import record, step_inputs

STEP_INPUTS = ("sample", "timestep")


def measure(bundle_dir: Path, model: str, variant: str | None, image_size: int = 256, repeats: int = 12,
            warmup: int = 2, threads: int = 2) -> dict:
    bundle = Bundle(bundle_dir)
    inputs = step_inputs(bundle, model, image_size, 500.0, seed=0)
    with OrtBackend(bundle, intra_op_threads=threads, variants={model: variant} if variant else None) as backend:
        step = backend.bind(model, {k: v for k, v in inputs.items() if k not in STEP_INPUTS})
        per_step = {k: inputs[k] for k in STEP_INPUTS}
        timings = interleaved({"run, all inputs": lambda: backend.run(model, inputs),
                               "bound step (IO binding)": lambda: step(per_step)}, repeats=repeats, warmup=warmup)
    return {"model": model, "variant": variant or "fp32", "image_size": image_size, "threads": threads,
            "repeats": repeats, "timings": timings}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.bound_step", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--model", default="bg_unet", choices=("bg_unet", "render_unet"))
    parser.add_argument("--variant", default=None, help="a registered variant (default: the exported fp32 model)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write bound_step-MODEL.json here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.bundle, args.model, args.variant, args.image_size, args.repeats, threads=args.threads)
    for name, stats in result["timings"].items():
        print(f"{args.model} {result['variant']:14s} {name:24s} p50 {stats['p50_ms']:8.1f} ms   min {stats['min_ms']:8.1f} ms")
    record(result, "bound_step", args.model, argv, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
