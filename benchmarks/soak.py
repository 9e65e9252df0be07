"""Soak test: many requests at a fixed concurrency against a real tritonserver, every answer
checked against the embedded backend (ONNX Runtime in this process), memory watched on both sides.

    python -m posterrt.benchmarks.soak --bundle bundles/tiny --requests 2000 --concurrency 8 \\
        --model plannet_denoiser --out soak.json
    python -m posterrt.benchmarks.soak --bundle bundles/tiny --requests 200 --concurrency 8 \\
        --pipeline layout --out soak_layout.json          # whole pipelines through Triton

Without ``--url`` it builds a cpu repository for what it needs in a temporary folder and starts
the nvidia-pytriton wheel's tritonserver on 127.0.0.1 (free ports); with ``--url`` it uses a
running server (server RSS then needs ``--server-pid``). Requests cycle over ``--distinct``
inputs (fixed seeds) whose expected outputs were computed in-process first, so a wrong answer is
caught, not just an error. Both the request count and the duration are bounded (``--max-seconds``:
stop submitting, report what finished).

Output (stdout summary, ``--out`` JSON): requests submitted/completed, failed (exceptions), wrong
(answers differing from the embedded backend), throughput, latency percentiles, and RSS of the
server (tritonserver plus its Python-backend stubs) and of this client process at start (after a
warm-up at full concurrency, so growth after it means a leak) and end, with samples in between.
Exit code 0 only when every request completed, none failed and none was wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

#: Same ONNX file on both sides: only the server's thread count (and batching) may reorder sums.
MODEL_REL_TOL = 1e-5
#: Pipelines: boxes within 1e-5 of the canvas, images above 60 dB PSNR (as the Triton tests).
PIPELINE_PSNR_DB = 60.0


@dataclass
class SoakConfig:
    bundle: Path
    requests: int = 2000
    concurrency: int = 8
    model: str | None = "plannet_denoiser"  # one served model, or ...
    pipeline: str | None = None  # ... a whole pipeline (layout, render, background, poster)
    protocol: str = "grpc"
    url: str | None = None  # a running server; None starts one
    server_pid: int | None = None
    distinct: int = 32
    max_seconds: float = 600.0
    sample_every_s: float = 2.0
    size: int = 256  # pipeline canvas
    steps: int = 2  # pipeline generator / layout steps
    timeout_s: float = 60.0
    #: pipelines: shares of the requests cancelled after their first progress event, and run with a
    #: deadline (``deadline_s``) shorter than they take; each must end cancelled, late or correct
    cancel_share: float = 0.0
    deadline_share: float = 0.0
    deadline_s: float = 0.05


@dataclass
class Tally:
    latencies: list = field(default_factory=list)
    failed: int = 0
    wrong: int = 0
    cancelled: int = 0  # cancel-share requests that stopped with RequestCancelled
    late: int = 0  # deadline-share requests that stopped with DeadlineExceeded
    errors: list = field(default_factory=list)  # the first few messages
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stopped(self, kind: str) -> None:
        with self.lock:
            if kind == "cancel":
                self.cancelled += 1
            else:
                self.late += 1

    def record(self, seconds: float | None, error: str | None = None, wrong: str | None = None) -> None:
        with self.lock:
            if error is not None:
                self.failed += 1
                if len(self.errors) < 10:
                    self.errors.append(error)
                return
            self.latencies.append(seconds)
            if wrong is not None:
                self.wrong += 1
                if len(self.errors) < 10:
                    self.errors.append(wrong)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def rss_mb(pid: int | None, with_children: bool) -> float | None:
    """Resident memory of a process (and its descendants: Triton's stubs) in MB."""
    import psutil

    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        processes = [process] + (process.children(recursive=True) if with_children else [])
        total = 0
        for item in processes:
            try:
                total += item.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 1e6
    except psutil.NoSuchProcess:
        return None


class MemoryWatch:
    """Samples server and client RSS every ``every_s`` in a background thread."""

    def __init__(self, server_pid: int | None, every_s: float):
        self.server_pid, self.every_s = server_pid, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-rss", daemon=True)
        self._started = time.monotonic()

    def sample(self) -> dict:
        entry = {"t_s": round(time.monotonic() - self._started, 2),
                 "server_mb": rss_mb(self.server_pid, with_children=True),
                 "client_mb": rss_mb(os.getpid(), with_children=False)}
        self.samples.append(entry)
        return entry

    def _loop(self):
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def summary(self) -> dict:
        def side(key):
            values = [s[key] for s in self.samples if s[key] is not None]
            if not values:
                return None
            # a leak grows in the second half as in the first; allocator pools settle in the first
            middle = values[len(values) // 2]
            return {"start_mb": round(values[0], 1), "end_mb": round(values[-1], 1), "peak_mb": round(max(values), 1),
                    "growth_mb": round(values[-1] - values[0], 1),
                    "second_half_growth_mb": round(values[-1] - middle, 1)}
        return {"server": side("server_mb"), "client": side("client_mb"), "samples": self.samples}


# ---------------------------------------------------------------------------------------------
# What one request is, and how its answer is checked
# ---------------------------------------------------------------------------------------------
def max_relative_error(got: dict, want: dict) -> float:
    worst = 0.0
    for name, expected in want.items():
        actual = got[name]
        if actual.shape != expected.shape:
            return float("inf")
        scale = max(float(np.abs(expected).max()), 1e-12)
        worst = max(worst, float(np.abs(actual.astype(np.float64) - expected).max()) / scale)
    return worst


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def pipeline_difference(got, want, size: int) -> str | None:
    """None when two pipeline results agree; otherwise what differs. The layout model's boxes are
    compared (``proposed``): refinement is exact code over them."""
    if [e.cls for e in got.proposed] != [e.cls for e in want.proposed]:
        return f"classes {[e.cls for e in got.proposed]} != {[e.cls for e in want.proposed]}"
    for a, b in zip(got.proposed, want.proposed):
        if np.abs(np.subtract(a.box, b.box)).max() > 1e-5 * size or abs(a.score - b.score) > 1e-5:
            return f"box {a.box} != {b.box}"
    quality = psnr(got.image, want.image)
    return None if quality > PIPELINE_PSNR_DB else f"image PSNR {quality:.1f} dB"


def model_workload(config: SoakConfig, bundle) -> tuple[list[str], list, Callable]:
    """(models to serve, expected answers, make_call(backend) -> call(index) -> error text or None)."""
    from posterrt.runtime.backends.onnxruntime import OrtBackend
    from posterrt.runtime.samples import default_sizes, sample_inputs

    contract = bundle.contract(config.model)
    # two sizes of every dynamic axis, alternating: the server's batches mix shapes it must split
    inputs = [sample_inputs(contract, default_sizes("small" if i % 2 else "opt"), seed=1000 + i)
              for i in range(config.distinct)]
    with OrtBackend(bundle, intra_op_threads=1) as reference:
        expected = [reference.run(config.model, x) for x in inputs]

    def make_call(backend):
        def call(index: int) -> str | None:
            slot = index % config.distinct
            error = max_relative_error(backend.run(config.model, inputs[slot]), expected[slot])
            return None if error <= MODEL_REL_TOL else f"request {index}: relative error {error:.2e}"
        return call

    return [config.model], expected, make_call


def pipeline_requests(config: SoakConfig) -> list:
    from posterrt.runtime.pipelines.request import PosterRequest

    requests = []
    for slot in range(config.distinct):
        rng = np.random.default_rng(slot)
        product = np.full((96, 128, 3), 200, np.uint8)
        product[20:80, 70:110] = rng.integers(0, 255, 3)
        mask = np.zeros((96, 128), np.float32)
        mask[20:80, 70:110] = 1.0
        requests.append(PosterRequest(product=product, product_mask=mask, texts=["Fresh juice", "50% off"],
                                      size=(config.size, config.size), steps=config.steps,
                                      layout_steps=config.steps, seed=slot))
    return requests


def pipeline_workload(config: SoakConfig, bundle) -> tuple[list[str], list, Callable]:
    from posterrt.runtime.backends.onnxruntime import OrtBackend
    from posterrt.runtime.pipelines import build_pipeline

    requests = pipeline_requests(config)
    with OrtBackend(bundle, intra_op_threads=1) as reference:
        pipeline = build_pipeline(config.pipeline, reference, progress=False)
        expected = [pipeline(r) for r in requests]

    def make_call(backend):
        from posterrt.runtime.progress import RunControl, controlled

        pipeline = build_pipeline(config.pipeline, backend, progress=False)

        def call(index: int) -> str | None:
            slot, kind = index % config.distinct, request_kind(index, config)
            control = RunControl(timeout=config.deadline_s if kind == "deadline" else None)
            if kind == "cancel":
                control.progress = lambda event: control.cancel()  # stops at the end of the first step
            with controlled(control):
                result = pipeline(requests[slot])
            difference = pipeline_difference(result, expected[slot], config.size)
            return None if difference is None else f"request {index}: {difference}"
        return call

    return pipeline_models(config, bundle), expected, make_call


def request_kind(index: int, config: SoakConfig) -> str:
    """"cancel", "deadline" or "plain", spread evenly over the indices in the configured shares."""
    spread = (index * 0.6180339887498949) % 1.0  # golden-ratio sequence: even at any run length
    if spread < config.cancel_share:
        return "cancel"
    return "deadline" if spread < config.cancel_share + config.deadline_share else "plain"


def pipeline_models(config: SoakConfig, bundle) -> list[str]:
    """The models the pipeline calls (the server must serve them): each pipeline module's list."""
    from posterrt.runtime.accuracy import pipeline_models as models_of

    return sorted(models_of(config.pipeline))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def run_soak(config: SoakConfig, log: Callable[[str], None] = print) -> dict:
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.bundle import Bundle
    from posterrt.runtime.errors import InputError

    if (config.model is None) == (config.pipeline is None):
        raise InputError("soak: give --model or --pipeline (one of them)")
    if (config.cancel_share or config.deadline_share) and config.pipeline is None:
        raise InputError("soak: --cancel-share and --deadline-share need --pipeline (a model call has no steps to stop)")
    if config.requests < 1 or config.concurrency < 1 or config.distinct < 1:
        raise InputError(f"soak: --requests, --concurrency and --distinct must be >= 1, got {config.requests}, "
                         f"{config.concurrency}, {config.distinct}")
    bundle = Bundle(config.bundle)
    started = time.monotonic()
    log(f"soak: computing {config.distinct} expected answers in-process")
    workload = model_workload if config.model is not None else pipeline_workload
    models, _, make_call = workload(config, bundle)
    with ExitStack() as stack:
        url, server_pid = config.url, config.server_pid
        if url is None:
            url, server_pid = start_local_server(stack, bundle, models + stages_of(models), config.protocol, log)
        backend = stack.enter_context(TritonBackend(bundle, url, models=models, timeout_s=config.timeout_s))
        call = make_call(backend)
        # Warm-up at full concurrency (sessions, connections, per-thread clients, allocator pools),
        # so the RSS at "start" is the settled size and growth after it means a leak.
        warmup = SoakConfig(**{**config.__dict__, "requests": max(4 * config.concurrency, config.requests // 20)})
        warmup_tally = Tally()
        drive(call, warmup_tally, warmup)
        if warmup_tally.failed or warmup_tally.wrong:
            log(f"soak: warm-up had {warmup_tally.failed} failed and {warmup_tally.wrong} wrong answers")
        tally = Tally()
        log(f"soak: {config.requests} requests at concurrency {config.concurrency} to {url} "
            f"({config.model or 'pipeline ' + config.pipeline})")
        with MemoryWatch(server_pid, config.sample_every_s) as memory:
            submitted, seconds = drive(call, tally, config)
        report = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
            "url": url, "models": models,
            "warmup_requests": warmup.requests,
            "submitted": submitted, "completed": len(tally.latencies), "failed": tally.failed, "wrong": tally.wrong,
            "cancelled": tally.cancelled, "deadline_exceeded": tally.late,
            "errors": tally.errors, "seconds": round(seconds, 2),
            "requests_per_s": round(len(tally.latencies) / seconds, 1) if seconds else None,
            "latency_ms": latency_summary(tally.latencies),
            "stopped_early": submitted < config.requests,
            "rss": memory.summary(),
            "server_answers": {s.url: s.answered for s in backend.servers},
            "wall_seconds_total": round(time.monotonic() - started, 1),
        }
    return report


def drive(call: Callable[[int], str | None], tally: Tally, config: SoakConfig) -> tuple[int, float]:
    """Keep ``concurrency`` requests in flight until ``requests`` were sent or ``max_seconds`` passed."""
    deadline = time.monotonic() + config.max_seconds

    from posterrt.runtime.errors import DeadlineExceeded, RequestCancelled

    def one(index: int) -> None:
        begin = time.perf_counter()
        kind = request_kind(index, config)
        try:
            wrong = call(index)
        except (RequestCancelled, DeadlineExceeded) as error:
            if (kind, type(error)) in (("cancel", RequestCancelled), ("deadline", DeadlineExceeded)):
                tally.stopped(kind)
            else:
                tally.record(None, error=f"request {index} ({kind}): {type(error).__name__}: {error}")
            return
        except Exception as error:  # counted, never raised: the soak reports every failure
            tally.record(None, error=f"request {index}: {type(error).__name__}: {error}")
            return
        tally.record(time.perf_counter() - begin, wrong=wrong)

    started = time.perf_counter()
    submitted = 0
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="soak") as pool:
        in_flight = set()
        while submitted < config.requests and time.monotonic() < deadline:
            while len(in_flight) < config.concurrency and submitted < config.requests:
                in_flight.add(pool.submit(one, submitted))
                submitted += 1
            _, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
        wait(in_flight)
    return submitted, time.perf_counter() - started


def latency_summary(latencies: list[float]) -> dict | None:
    if not latencies:
        return None
    values = np.asarray(latencies) * 1e3
    return {"p50": round(float(np.percentile(values, 50)), 2), "p90": round(float(np.percentile(values, 90)), 2),
            "p99": round(float(np.percentile(values, 99)), 2), "max": round(float(values.max()), 2)}


def stages_of(models: list[str]) -> list[str]:
    """The server stages that drive only ``models`` (served with them, as a whole repository would)."""
    from posterrt.runtime.server_stages import SERVER_STAGES

    return [name for name, stage in SERVER_STAGES.items() if set(stage.models) <= set(models)]


def start_local_server(stack: ExitStack, bundle, models: list[str], protocol: str, log) -> tuple[str, int]:
    """A cpu repository of ``models`` in a temporary folder, served on 127.0.0.1 (free ports)."""
    import socket

    from posterrt.runtime.triton.repository import build_repository
    from posterrt.runtime.triton.server import TritonServer

    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="posterrt-soak-")))
    build_repository(bundle, workdir / "repo", models=models)
    ports = []
    while len(ports) < 3:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            if probe.getsockname()[1] not in ports:
                ports.append(probe.getsockname()[1])
    tail: list[str] = []
    server = stack.enter_context(TritonServer(workdir / "repo", http_port=ports[0], grpc_port=ports[1],
                                              metrics_port=ports[2], log=tail.append))
    log(f"soak: tritonserver pid {server.process.pid} serving {', '.join(server.models)}")
    return (server.grpc_url if protocol == "grpc" else server.http_url), server.process.pid


def summary_lines(report: dict) -> list[str]:
    rss = report["rss"]
    lines = [f"requests: {report['completed']}/{report['submitted']} completed, {report['failed']} failed, "
             f"{report['wrong']} wrong, {report['cancelled']} cancelled, {report['deadline_exceeded']} past their "
             f"deadline, in {report['seconds']} s ({report['requests_per_s']} req/s)"]
    if report["latency_ms"]:
        lat = report["latency_ms"]
        lines.append(f"latency ms: p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}")
    for side in ("server", "client"):
        if rss[side]:
            lines.append(f"{side} RSS MB: start {rss[side]['start_mb']} end {rss[side]['end_mb']} "
                         f"peak {rss[side]['peak_mb']} (growth {rss[side]['growth_mb']:+}, second half "
                         f"{rss[side]['second_half_growth_mb']:+})")
    lines += [f"error: {e}" for e in report["errors"][:5]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="exported bundle (tiny is what the figures use)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help="one served model (default plannet_denoiser)")
    what.add_argument("--pipeline", default=None, help="a whole pipeline: layout, render, background, poster")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", default=None, help="a running server (default: start one on 127.0.0.1)")
    parser.add_argument("--server-pid", type=int, default=None, help="its process id, to watch its memory")
    parser.add_argument("--distinct", type=int, default=32, help="distinct inputs cycled over (default 32)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop submitting after this (default 600)")
    parser.add_argument("--size", type=int, default=256, help="pipeline canvas size (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="pipeline steps (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    parser.add_argument("--cancel-share", type=float, default=0.0,
                        help="pipelines: share of requests cancelled after their first step (default 0)")
    parser.add_argument("--deadline-share", type=float, default=0.0,
                        help="pipelines: share of requests with a deadline shorter than they take (default 0)")
    parser.add_argument("--deadline", type=float, default=0.05, help="that deadline, seconds (default 0.05)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    from posterrt.runtime.errors import PosterRTError

    config = SoakConfig(bundle=args.bundle, requests=args.requests, concurrency=args.concurrency,
                        model=None if args.pipeline else (args.model or "plannet_denoiser"), pipeline=args.pipeline,
                        protocol=args.protocol, url=args.url, server_pid=args.server_pid, distinct=args.distinct,
                        max_seconds=args.max_seconds, size=args.size, steps=args.steps, timeout_s=args.timeout,
                        cancel_share=args.cancel_share, deadline_share=args.deadline_share, deadline_s=args.deadline)
    try:
        report = run_soak(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except PosterRTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 0 if report["failed"] == 0 and report["wrong"] == 0 and not report["stopped_early"] else 1


if __name__ == "__main__":
    sys.exit(main())
