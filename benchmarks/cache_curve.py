"""The UNet feature cache's speed/quality curve: a UNet pipeline (background, render) with cache
interval N = 1..5, interleaved round by round on the embedded backend. Per N: the loop's model time
(the UNet calls: plain, deep or shallow steps) and its ratio to N = 1 in the same round, the wall
time of the whole pipeline, and the image's PSNR / SSIM against N = 1 (same request and seed).

    python -m posterrt.benchmarks.cache_curve --bundle bundles/tiny --pipeline background --steps 30

A step's own cost (plain / deep / shallow) is the median of its calls, so the curve can be read
against the per-step ratio: at interval N the loop costs (deep + (N - 1) shallow) / N per step.
``--step-costs UNET`` times those three steps alone, for a bundle that holds only the UNet's graphs
(a paper-size export of the whole pipeline is the expensive part).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from posterrt.runtime.accuracy import image_agreement
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import parse_variant_list
from posterrt.runtime.errors import InputError
from posterrt.runtime.pipelines import build_pipeline

from .cli import _ints
from .machine import describe
from .serving import TimedBackend, demo_request, embedded_backend

INTERVALS = (1, 2, 3, 4, 5)


def curve(bundle_dir, pipeline: str = "background", intervals=INTERVALS, steps: int = 30, size: int = 256,
          rounds: int = 3, warmup: int = 1, threads: int = 2, seed: int = 0, variants: dict | None = None,
          progress: bool = True) -> dict:
    from posterrt.runtime.families import FAMILIES

    bundle = Bundle(bundle_dir)
    backend = TimedBackend(embedded_backend(bundle, threads, variants), server_loops=False)
    runner = build_pipeline(pipeline, backend, progress=False)
    family = next(f for f in FAMILIES.values() if f.stage == pipeline)
    unet_graphs = {family.denoiser, *family.cached_steps}  # not PlanNet's steps in the render pipeline
    samples = {n: {"loop_s": [], "wall_s": []} for n in intervals}
    step_calls: dict[str, list[float]] = {}
    images = {}
    bar = tqdm(total=(warmup + rounds) * len(intervals), desc=f"{pipeline} cache", unit="run", disable=not progress)
    for index in range(warmup + rounds):
        for interval in intervals:
            request = demo_request(size, steps, seed)
            request.cache_interval = interval
            backend.calls.clear()
            started = time.perf_counter()
            images[interval] = runner(request).image
            wall = time.perf_counter() - started
            calls = [(model, seconds) for model, _, seconds in backend.calls if model in unet_graphs]
            if index >= warmup:
                samples[interval]["loop_s"].append(sum(seconds for _, seconds in calls))
                samples[interval]["wall_s"].append(wall)
                for model, seconds in calls:
                    step_calls.setdefault(model, []).append(seconds)
            bar.update()
    bar.close()
    # loop ratio per round against N = 1 of the same round, then the median over rounds
    baseline = np.asarray(samples[intervals[0]]["loop_s"])
    table = {}
    for interval in intervals:
        loop = np.asarray(samples[interval]["loop_s"])
        table[interval] = {"loop_p50_s": float(np.median(loop)), "wall_p50_s": float(np.median(samples[interval]["wall_s"])),
                           "loop_speedup_p50": float(np.median(baseline / loop)),
                           # the least disturbed rounds of a shared machine: fastest loop against fastest loop
                           "loop_speedup_min": float(baseline.min() / loop.min()),
                           **image_agreement(images[intervals[0]], images[interval])}
    return {"table": table, "step_p50_ms": {m: float(np.median(v) * 1e3) for m, v in step_calls.items()}}


def step_costs(bundle_dir, unet: str = "bg_unet", size: int = 512, repeats: int = 5, warmup: int = 1,
               threads: int = 2, seed: int = 0) -> dict:
    """The plain, deep and shallow step of ``unet`` alone (no other model needed: a paper-size bundle of
    the three graphs is enough; without the plain step, the deep one is the full step), one guided
    step each (batch 2) on the same inputs, interleaved."""
    from posterrt.runtime.families import cached_steps

    from .flops import count_flops
    from .timing import interleaved
    from .unet_step import step_inputs

    bundle = Bundle(bundle_dir)
    backend = embedded_backend(bundle, threads)
    deep, shallow = cached_steps(unet)
    # the deep step is the full step: it stands in for the plain one in a bundle without it (memory)
    full = unet if unet in bundle.models else deep
    inputs = step_inputs(bundle, deep, size, timestep=500.0, seed=seed)
    feature = backend.run(deep, inputs)["deep_feature"]
    feeds = {m: inputs for m in dict.fromkeys((full, deep))}
    feeds[shallow] = {**inputs, "deep_feature": feature}
    candidates = {m: (lambda m=m: backend.run(m, feeds[m])) for m in feeds}
    timings = interleaved(candidates, repeats=repeats, warmup=warmup)
    # the work itself, counted from the graphs (load-independent, unlike a shared machine's timings)
    gflop = {m: count_flops(bundle.model_path(m), feeds[m])["total"] / 1e9 for m in feeds}
    p50, fastest = ({m: timings[m][key] for m in feeds} for key in ("p50_ms", "min_ms"))  # min: least disturbed
    return {"size": size, "full_step": full, "timings": timings, "gflop": gflop,
            "shallow_over_plain": p50[shallow] / p50[full], "deep_over_plain": p50[deep] / p50[full],
            "shallow_over_plain_min": fastest[shallow] / fastest[full],
            "shallow_over_plain_gflop": gflop[shallow] / gflop[full]}


def markdown(result: dict) -> str:
    lines = ["| interval N | loop p50 s | loop speedup vs N=1 (p50 / min) | pipeline p50 s | PSNR vs N=1 | SSIM vs N=1 |",
             "|---|---|---|---|---|---|"]
    for interval, row in result["table"].items():
        psnr = "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB"
        lines.append(f"| {interval} | {row['loop_p50_s']:.3f} | {row['loop_speedup_p50']:.2f}x / {row['loop_speedup_min']:.2f}x | "
                     f"{row['wall_p50_s']:.3f} | {psnr} | {row['ssim']:.4f} |")
    steps = ", ".join(f"{model} {ms:.1f} ms" for model, ms in result["step_p50_ms"].items())
    return "\n".join(lines) + f"\n\nper call (p50): {steps}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.cache_curve", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--pipeline", default="background", choices=("background", "render"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intervals", default=",".join(map(str, INTERVALS)), help="cache intervals, the first the baseline")
    parser.add_argument("--variants", help="MODEL=VARIANT,... gated variants of the bundle (default: the exported files)")
    parser.add_argument("--step-costs", metavar="UNET", help="instead: time UNET's plain, deep and shallow step alone")
    parser.add_argument("--out", type=Path, help="JSON file for the curve, the command and the machine")
    args = parser.parse_args(argv)
    if args.step_costs:
        result = step_costs(args.bundle, args.step_costs, size=args.size, repeats=args.rounds, threads=args.threads)
        print("\n".join(f"{model}: p50 {row['p50_ms']:.1f} ms, min {row['min_ms']:.1f} ms, {result['gflop'][model]:.1f} GFLOP"
                        for model, row in result["timings"].items())
              + f"\nshallow / {result['full_step']}: p50 {result['shallow_over_plain']:.3f}, min "
                f"{result['shallow_over_plain_min']:.3f}, GFLOP {result['shallow_over_plain_gflop']:.3f}; deep / "
                f"{result['full_step']} p50 {result['deep_over_plain']:.3f}")
    else:
        try:
            intervals = tuple(_ints(args.intervals, "intervals"))
        except InputError as error:
            parser.error(str(error))
        result = curve(args.bundle, args.pipeline, intervals, steps=args.steps, size=args.size, rounds=args.rounds,
                       threads=args.threads, variants=parse_variant_list(args.variants))
        print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python -m posterrt.benchmarks.cache_curve " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": describe(measure_peak=False),
                  "bundle_preset": Bundle(args.bundle).preset, "pipeline": args.pipeline, "steps": args.steps,
                  "size": args.size, "rounds": args.rounds, "variants": args.variants, **result}
        args.out.write_text(json.dumps(record, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
