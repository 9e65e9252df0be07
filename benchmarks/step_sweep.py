"""How far each sampler is from its converged result: a UNet pipeline (background, render) run with
10/15/20/30/50 steps against the same sampler with 100 steps, same request and seed; image PSNR
(RGB, peak 255) and SSIM (luminance) of the final pictures. Embedded ONNX Runtime, fp32 bundle.

    python -m posterrt.benchmarks.step_sweep --bundle bundles/tiny --out benchmarks/results/tiny/step_sweep.json

With random weights (the presets without ``--from-pretrained``) the table measures the samplers'
convergence on that network, not picture quality; pick defaults from a run on trained weights.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from posterrt.runtime.accuracy import image_agreement
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.errors import InputError
from posterrt.runtime.pipelines import build_pipeline
from posterrt.runtime.pipelines.request import SCHEDULERS

from .cli import _ints
from .machine import describe
from .serving import demo_request, embedded_backend

STEPS = (10, 15, 20, 30, 50)
REFERENCE_STEPS = 100


def sweep(bundle_dir, pipeline: str = "background", schedulers=SCHEDULERS, steps=STEPS, reference_steps=REFERENCE_STEPS,
          image_size: int = 256, seed: int = 0, threads: int = 2, progress: bool = True) -> dict:
    """``{scheduler: {steps: {"psnr_db", "ssim", "seconds"}}}`` against ``reference_steps`` of the same scheduler."""
    bundle = Bundle(bundle_dir)
    runner = build_pipeline(pipeline, embedded_backend(bundle, threads), progress=False)
    table = {}
    bar = tqdm(total=len(schedulers) * (len(steps) + 1), desc=f"{pipeline} steps", unit="run", disable=not progress)
    for scheduler in schedulers:
        images = {}
        for count in (reference_steps, *steps):
            bar.set_postfix_str(f"{scheduler} {count}")
            request = demo_request(image_size, count, seed)
            request.scheduler = scheduler
            started = time.perf_counter()
            images[count] = (runner(request).image, time.perf_counter() - started)
            bar.update()
        reference = images[reference_steps][0]
        table[scheduler] = {count: {**image_agreement(reference, images[count][0]), "seconds": images[count][1]}
                            for count in steps}
    bar.close()
    return table


def markdown(table: dict, reference_steps: int = REFERENCE_STEPS) -> str:
    steps = list(next(iter(table.values())))
    lines = ["| scheduler | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for scheduler, row in table.items():
        cells = [("identical" if row[s]["psnr_db"] is None else f"{row[s]['psnr_db']:.1f} dB") + f" / {row[s]['ssim']:.3f}"
                 for s in steps]
        lines.append(f"| {scheduler} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPSNR / SSIM of the final image against {reference_steps} steps of the same scheduler."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.step_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--pipeline", default="background", choices=("background", "render"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated, of " + ",".join(SCHEDULERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts to compare with the reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON file for the table and the machine")
    args = parser.parse_args(argv)
    schedulers = [name for name in args.schedulers.split(",") if name]
    unknown = sorted(set(schedulers) - set(SCHEDULERS))
    if unknown:
        parser.error(f"--schedulers: unknown {', '.join(unknown)}; expected some of {', '.join(SCHEDULERS)}")
    try:
        steps = tuple(_ints(args.steps, "steps"))
    except InputError as error:
        parser.error(str(error))
    table = sweep(args.bundle, args.pipeline, schedulers, steps, image_size=args.image_size, seed=args.seed,
                  threads=args.threads)
    print(markdown(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python -m posterrt.benchmarks.step_sweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": describe(measure_peak=False),
                  "bundle_preset": Bundle(args.bundle).preset, "pipeline": args.pipeline, "image_size": args.image_size,
                  "seed": args.seed, "reference_steps": REFERENCE_STEPS, "table": table}
        args.out.write_text(json.dumps(record, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
