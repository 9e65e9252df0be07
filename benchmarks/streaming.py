"""What streamed progress and cancellation cost in the server stages (issue 16).

``python -m posterrt.benchmarks.streaming --bundle bundles/tiny``: one tritonserver on 127.0.0.1
with the background and PlanNet models and their server stages, then, over gRPC:

* streaming's cost: each stage's loop through its plain model (one answer) and through its
  streamed model with a progress callback (a progress response per step, coalesced to one per
  10 ms), interleaved; the difference per step and as a share of the loop;
* cancel -> free instance: a 50-step UNet loop cancelled after 3 steps, then a one-step request to
  the same single-instance stage; its latency minus a one-step request's on an idle stage is the
  time the cancelled loop still held the instance, in UNet steps.

Figures go to benchmarks/RESULTS.md (Streaming); nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .timing import interleaved

UNET = "bg_unet"
STAGE_MODELS = ["clip_text_encoder", "image_encoder", "vae_encoder", "bg_unet", "vae_decoder",
                "plannet_encoder", "plannet_denoiser"]


def unet_case(bundle):
    from posterrt.runtime.samples import default_sizes, sample_inputs
    from posterrt.runtime.schedulers import get_scheduler

    inputs = sample_inputs(bundle.contract(UNET), {**default_sizes("small"), "cfg_batch": 2}, seed=0)
    fixed = {name: array for name, array in inputs.items() if name not in ("sample", "timestep")}
    config = bundle.config["stable_diffusion"]["scheduler"]
    return lambda stage, steps: stage(get_scheduler("ddim", config), inputs["sample"][:1], steps, 7.5, fixed,
                                      np.random.default_rng(0))


def plannet_case(bundle):
    from posterrt.runtime.samples import default_sizes, sample_inputs
    from posterrt.runtime.schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig

    memory = sample_inputs(bundle.contract("plannet_denoiser"), default_sizes("small"), seed=0)
    sampler = PlanNetSampler(PlanNetSamplerConfig.from_bundle_config(bundle.config["plannet"]))
    fixed = sampler.blank_tokens(1)
    return lambda stage, steps: stage(memory["memory"], memory["memory_mask"], fixed, steps, [np.random.default_rng(0)])


def streaming_cost(backend, repeats: int) -> list[dict]:
    from posterrt.runtime.backends.triton_stages import StageClient
    from posterrt.runtime.progress import RunControl, controlled

    rows = []
    for name, case, steps in (("bg_unet_sampler", unet_case(backend.bundle), 20),
                              ("plannet_sampler", plannet_case(backend.bundle), 100)):
        streamed = backend.server_stage(name)
        assert streamed is not None and streamed.streaming, f"the server streams {name}"
        plain = StageClient(backend, streamed.stage, streamed.servers, streaming=set())
        events = []

        def with_progress(stage=streamed, case=case, steps=steps):
            with controlled(RunControl(events.append)):
                case(stage, steps)

        timings = interleaved({"plain": lambda: case(plain, steps), "streamed": with_progress}, repeats=repeats, warmup=2)
        plain_ms, streamed_ms = timings["plain"]["p50_ms"], timings["streamed"]["p50_ms"]
        rows.append({"stage": name, "steps": steps, "plain_p50_ms": round(plain_ms, 2),
                     "streamed_p50_ms": round(streamed_ms, 2), "n": timings["plain"]["n"],
                     "cost_per_step_ms": round((streamed_ms - plain_ms) / steps, 4),
                     "cost_share": round(streamed_ms / plain_ms - 1, 4),
                     "events_per_run": len(events) // (repeats + 2)})
    return rows


def cancel_to_free(backend, cycles: int) -> dict:
    from posterrt.runtime.progress import RunControl, controlled

    stage, case = backend.server_stage("bg_unet_sampler"), unet_case(backend.bundle)

    def run(steps, control):
        with controlled(control):
            case(stage, steps)

    idle = interleaved({"one step": lambda: run(1, RunControl())}, repeats=cycles, warmup=2)["one step"]["p50_ms"]
    held, step_ms = [], []
    for _ in range(cycles):
        stamps, third = [], threading.Event()

        def report(event, stamps=stamps, third=third):
            stamps.append(time.perf_counter())
            if event.step == 3:
                third.set()

        control = RunControl(report)
        worker = threading.Thread(target=lambda: _quietly(run, 50, control))
        worker.start()
        third.wait(60)
        control.cancel()
        cancelled = time.perf_counter()
        run(1, RunControl())
        held.append((time.perf_counter() - cancelled) * 1e3 - idle)
        worker.join()
        step_ms.append(float(np.median(np.diff(stamps))) * 1e3)
    step = float(np.median(step_ms))
    return {"cycles": cycles, "one_step_request_idle_p50_ms": round(idle, 2), "unet_step_p50_ms": round(step, 2),
            "held_after_cancel_p50_ms": round(float(np.median(held)), 2),
            "held_after_cancel_max_ms": round(float(np.max(held)), 2),
            "held_after_cancel_p50_steps": round(float(np.median(held)) / step, 2)}


def _quietly(function, *args):
    try:
        function(*args)
    except Exception:  # the cancelled loop's RequestCancelled
        pass


def main(argv=None) -> int:
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.bundle import Bundle
    from posterrt.runtime.triton.repository import build_repository

    from .machine import describe

    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.streaming", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    bundle = Bundle(args.bundle)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="posterrt-streaming-") as workdir:
        from posterrt.runtime.triton.server import TritonServer

        from .serving import free_port

        repo = Path(workdir) / "repo"
        build_repository(bundle, repo, models=[*STAGE_MODELS, "bg_unet_sampler", "plannet_sampler"])
        server = stack.enter_context(TritonServer(repo, http_port=free_port(), grpc_port=free_port(),
                                                  metrics_port=free_port(), log=lambda line: None))
        backend = stack.enter_context(TritonBackend(bundle, server.grpc_url))
        report = {"machine": describe(measure_peak=False), "streaming": streaming_cost(backend, args.repeats),
                  "cancel_to_free": cancel_to_free(backend, args.cycles)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
