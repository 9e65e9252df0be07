"""Pipelines end to end and per stage on each backend (embedded ONNX Runtime, Triton HTTP, gRPC,
gRPC + shared memory), the per-step cost inside the loop, and throughput against concurrency.

The Triton servers are started here on free 127.0.0.1 ports from repositories built for the same
bundle, with the same ONNX Runtime thread count as the embedded backend so that the ratio
measures serving overhead, not a different thread setting.
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from posterrt.runtime.backends import open_backend
from posterrt.runtime.backends.base import Backend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import STEP, get_contract

from posterrt.runtime.samples import sample_inputs

from .models import bench_sizes
from .timing import summarize

THROUGHPUT_MODELS = ("radm_head", "plannet_denoiser")


class TimedBackend(Backend):
    """Wraps a backend and records every call: model, start and duration (thread-safe)."""

    def __init__(self, inner: Backend):
        super().__init__(inner.bundle)
        self.inner = inner
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def contract(self, model):
        return self.inner.contract(model)

    def run(self, model, inputs):
        started = time.perf_counter()
        outputs = self.inner.run(model, inputs)
        with self._lock:
            self.calls.append((model, started, time.perf_counter() - started))
        return outputs

    def _run(self, contract, inputs):  # run() is overridden; never reached
        raise AssertionError("TimedBackend forwards run()")

    def close(self):
        self.inner.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def demo_request(size: int, steps: int | None, seed: int = 0):
    from posterrt.runtime.commands.demo import PRODUCT
    from posterrt.runtime.images import load_product
    from posterrt.runtime.pipelines.request import PosterRequest

    product, mask = load_product(PRODUCT)
    return PosterRequest(product=product, product_mask=mask, texts=["Fresh orange juice", "50% off today"],
                         category="juice", size=(size, size), steps=steps, seed=seed)


def start_server(stack: ExitStack, bundle: Bundle, workdir: Path, name: str, threads: int, batching: bool | None):
    from posterrt.runtime.triton.model_config import ServingOptions
    from posterrt.runtime.triton.repository import build_repository
    from posterrt.runtime.triton.server import TritonServer

    repo = workdir / name
    build_repository(bundle, repo, ServingOptions(flavor="cpu", intra_op_threads=threads, dynamic_batching=batching))
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log=None)
    stack.enter_context(server)
    return server


def step_hoisting(calls: list[tuple[str, float, float]], step_model: str) -> dict | None:
    """Per-step wall interval in the loop (start of one step-model call to the next) against the
    step model's own call time: equal within a few % when nothing else runs per step."""
    starts = [start for model, start, _ in calls if model == step_model]
    durations = [duration for model, _, duration in calls if model == step_model]
    if len(starts) < 3:
        return None
    intervals = np.diff(starts)
    return {"step_model": step_model, "steps": len(starts),
            "interval_p50_ms": float(np.median(intervals) * 1e3),
            "model_call_p50_ms": float(np.median(durations[:-1]) * 1e3),
            "loop_overhead_ratio": float(np.median(intervals) / np.median(durations[:-1]))}


def bench_stages(results: dict, bundle: Bundle, backends: dict[str, Backend], pipelines: list[str],
                 image_size: int, steps: int | None, repeats: int) -> None:
    from posterrt.runtime.pipelines import build_pipeline

    rows, hoisting = [], []
    for pipeline_name in tqdm(pipelines, desc="pipelines", unit="pipeline"):
        timed = {name: TimedBackend(backend) for name, backend in backends.items()}
        pipes = {name: build_pipeline(pipeline_name, backend, progress=False) for name, backend in timed.items()}
        samples: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in pipes}
        for index in range(repeats + 1):  # round 0 warms up every backend
            for name, pipe in pipes.items():
                timed[name].calls.clear()
                started = time.perf_counter()
                result = pipe(demo_request(image_size, steps, seed=index))
                total = time.perf_counter() - started
                if index == 0:
                    continue
                samples[name]["end_to_end"].append(total)
                for stage, seconds in result.timings.items():
                    samples[name][stage].append(seconds)
                per_model = defaultdict(float)
                for model, _, duration in timed[name].calls:
                    per_model[model] += duration
                for model, seconds in per_model.items():
                    samples[name][f"model:{model}"].append(seconds)
                if index == repeats:
                    for model in {m for m, _, _ in timed[name].calls if get_contract(m).role == STEP}:
                        found = step_hoisting(timed[name].calls, model)
                        if found:
                            hoisting.append({"pipeline": pipeline_name, "backend": name, **found})
        embedded = {stage: statistics.median(values) for stage, values in samples.get("embedded", {}).items()}
        for name, stages in samples.items():
            for stage, values in stages.items():
                stats = summarize(values)
                ratio = stats["p50_ms"] / 1e3 / embedded[stage] if stage in embedded and embedded[stage] > 0 else None
                rows.append({"pipeline": pipeline_name, "stage": stage, "backend": name,
                             **{k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "n")},
                             "ratio_to_embedded": ratio})
    results["stages"] = rows
    results["step_hoisting"] = hoisting


def run_clients(backend: Backend, model: str, inputs: dict, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client():
        mine = []
        for _ in range(per_client):
            started = time.perf_counter()
            try:
                backend.run(model, inputs)
            except BaseException as error:  # recorded and re-raised below: a benchmark must not hide failures
                errors.append(error)
                return
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    stats = summarize(latencies)
    return {"rps": len(latencies) / wall, **{k: stats[k] for k in ("p50_ms", "p99_ms")}, "requests": len(latencies)}


def server_counts(url: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) from Triton's statistics: fewer executions = batched."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url.split("://", 1)[1])
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
    finally:
        client.close()


def bench_serving(results: dict, bundle: Bundle, args, serving: list[str], skip: set[str]) -> None:
    from posterrt.runtime.pipelines import PIPELINES

    from .cli import _csv, _ints

    pipelines = _csv(args.pipelines, tuple(PIPELINES), "pipelines")
    threads = args.threads or None
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="posterrt-bench-") as workdir:
        workdir = Path(workdir)
        backends: dict[str, Backend] = {"embedded": stack.enter_context(open_backend(bundle, None, intra_op_threads=threads))}
        server = None
        if serving:
            ort_threads = threads or len(os.sched_getaffinity(0))
            server = start_server(stack, bundle, workdir, "repo", ort_threads, batching=None)
            if "http" in serving:
                backends["triton-http"] = stack.enter_context(open_backend(bundle, server.http_url))
            if "grpc" in serving:
                backends["triton-grpc"] = stack.enter_context(open_backend(bundle, server.grpc_url))
                backends["triton-grpc-shm"] = stack.enter_context(open_backend(bundle, server.grpc_url, shared_memory=True))
        if "stages" not in skip:
            bench_stages(results, bundle, backends, pipelines, args.image_size, args.steps, max(2, args.repeats))
        if "throughput" not in skip and "grpc" in serving:
            # One instance, one ORT thread per model: the batching effect, not extra threads, is measured.
            servers = {True: start_server(stack, bundle, workdir, "batching", 1, batching=True),
                       False: start_server(stack, bundle, workdir, "no-batching", 1, batching=False)}
            rows = []
            models = [m for m in THROUGHPUT_MODELS if m in bundle.models]
            for model in tqdm(models, desc="throughput", unit="model"):
                inputs = sample_inputs(bundle.contract(model), bench_sizes(args.image_size, 1), seed=0)
                for batching, triton in servers.items():
                    backend = stack.enter_context(open_backend(bundle, triton.grpc_url))
                    run_clients(backend, model, inputs, 1, 3)  # warm-up
                    for clients in _ints(args.concurrency, "concurrency"):
                        before = server_counts(triton.grpc_url, model)
                        row = run_clients(backend, model, inputs, clients, max(4, args.repeats * 4))
                        after = server_counts(triton.grpc_url, model)
                        rows.append({"model": model, "dynamic_batching": batching, "concurrency": clients, **row,
                                     "inferences": after[0] - before[0], "executions": after[1] - before[1]})
            results["throughput"] = rows
