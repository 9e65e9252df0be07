"""PlanNet's client loop on the embedded backend, step by step: the interval between two denoiser
calls, the call itself and the gap between them (the sampler's own per-step work), medians over
plans. The quick check behind target 4's PlanNet figure: run it on two checkouts to compare code.

    python -m posterrt.benchmarks.plan_step --bundle bundles/tiny --plans 40
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from posterrt.runtime.bundle import Bundle

from .serving import TimedBackend, demo_request, embedded_backend, step_hoisting

STEP_MODEL = "plannet_denoiser"


def measure(bundle_dir, plans: int = 40, warmup: int = 5, threads: int = 1) -> dict:
    from posterrt.runtime.pipelines.plan import PlanNetPlanner

    timed = TimedBackend(embedded_backend(Bundle(bundle_dir), threads))
    planner = PlanNetPlanner(timed)
    request = demo_request(256, None)
    rounds = []
    for index in range(warmup + plans):
        timed.calls.clear()
        planner(request)
        if index >= warmup:
            rounds.append(list(timed.calls))
    result = step_hoisting(rounds, STEP_MODEL)
    gaps = []  # end of one call to the start of the next: (start, duration) records
    for calls in rounds:
        steps = [c for c in calls if c[0] == STEP_MODEL]
        gaps += [b[1] - (a[1] + a[2]) for a, b in zip(steps, steps[1:])]
    result["gap_p50_us"] = float(np.median(gaps) * 1e6)
    result["plans"] = plans
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.plan_step", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--plans", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.plans, threads=args.threads)
    print(f"{STEP_MODEL}, {result['steps']} steps, {args.plans} plans: interval {result['interval_p50_ms'] * 1e3:.1f} us, "
          f"call {result['model_call_p50_ms'] * 1e3:.1f} us, gap {result['gap_p50_us']:.1f} us, "
          f"interval / call {result['loop_overhead_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
