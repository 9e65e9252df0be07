"""Pipelines end to end and per stage on each backend (embedded ONNX Runtime, Triton HTTP, gRPC,
gRPC + shared memory), the per-step cost inside the loop, throughput against concurrency, and the
PlanNet loop client-side against server-side.

The Triton servers are started here on free 127.0.0.1 ports from repositories built for the same
bundle, with the same ONNX Runtime thread count and the same spinning policy (none) as the
embedded backend, so that the ratio measures serving overhead, not a different thread setting.
Candidates are interleaved round by round (the machine is shared: a slow phase hits all alike)
and every figure is a median over the rounds.
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
from posterrt.runtime.contracts import CONTRACTS, STEP

from posterrt.runtime.samples import sample_inputs

from .models import bench_sizes
from .timing import summarize

THROUGHPUT_MODELS = ("radm_head", "plannet_denoiser")
#: Tensors from this size on go through shared memory in the gRPC + shm backend. Python gRPC moves
#: a few hundred KB in milliseconds on a busy machine (flow-control round trips need the server's
#: threads scheduled); below a few KB a region costs more than it saves (RESULTS.md, Serving).
SHM_THRESHOLD_BYTES = 4 << 10


class TimedBackend(Backend):
    """Wraps a backend and records every call: model, start and duration (thread-safe).

    ``server_loops``: whether pipelines may use the wrapped backend's server-side loops (recorded
    as one call of ``plannet_sampler`` / ``<unet>_sampler`` / ``radm_layout``); False makes them loop on
    the client."""

    def __init__(self, inner: Backend, server_loops: bool = True):
        super().__init__(inner.bundle)
        self.inner = inner
        self.server_loops = server_loops
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def contract(self, model):
        return self.inner.contract(model)

    def run(self, model, inputs):
        started = time.perf_counter()
        outputs = self.inner.run(model, inputs)
        self.record(model, started)
        return outputs

    def bind(self, model, fixed_inputs):
        """The wrapped backend's per-step call (step-invariant inputs checked once), each step recorded."""
        step = self.inner.bind(model, fixed_inputs)

        def timed_step(inputs):
            started = time.perf_counter()
            outputs = step(inputs)
            self.record(model, started)
            return outputs

        return timed_step

    def record(self, model: str, started: float) -> None:
        with self._lock:
            self.calls.append((model, started, time.perf_counter() - started))

    def server_stage(self, name: str):
        """The wrapped backend's server stage ``name`` (None: the pipeline loops on the client, as
        always without ``server_loops``), its one call timed like a model call of ``name``."""
        stage = self.inner.server_stage(name) if self.server_loops else None
        if stage is None:
            return None

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = stage(*args, **kwargs)
            self.record(name, started)
            return result

        return timed

    def _run(self, contract, inputs):  # run() is overridden; never reached
        raise AssertionError("TimedBackend forwards run()")

    def close(self):
        self.inner.close()


def embedded_backend(bundle: Bundle, threads: int, variants: dict | None = None) -> Backend:
    """ONNX Runtime in-process with the server's settings: ``threads`` intra-op threads, no spinning
    (model.py's default), the bundle's ``variants`` named (``{model: variant}``; none: the exported
    files, never this CPU's default variants: a bench names what it measures). With ORT's own
    default (a spinning thread per core) the baseline would measure a different thread policy, not
    serving: on this shared 2-core machine spinning made bg_unet 1.6x slower per call
    (bench_ort_settings)."""
    backend = open_backend(bundle, None, intra_op_threads=threads, variants=dict(variants or {}))
    backend.options_template.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return backend


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


def start_server(stack: ExitStack, bundle: Bundle, workdir: Path, name: str, options, models: list[str] | None = None):
    """A tritonserver on free ports serving ``models`` (default: the whole bundle, server loops included)."""
    from posterrt.runtime.triton.repository import build_repository
    from posterrt.runtime.triton.server import TritonServer

    repo = workdir / name
    build_repository(bundle, repo, options, models=models)
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log=None)
    stack.enter_context(server)
    return server


def serving_options(**fields):
    """The cpu flavor's ServingOptions with ``fields`` changed."""
    from posterrt.runtime.triton.model_config import ServingOptions

    return ServingOptions(flavor="cpu", **fields)


def step_hoisting(rounds: list[list[tuple[str, float, float]]], step_model: str) -> dict | None:
    """Per-step wall interval in the loop (start of one step-model call to the next, within a round)
    against the step model's own call time, pooled over rounds: equal within a few % when nothing
    else runs per step. ``rounds``: the recorded calls of each pipeline run."""
    intervals, durations = [], []
    for calls in rounds:
        starts = [start for model, start, _ in calls if model == step_model]
        intervals += list(np.diff(starts))
        durations += [duration for model, _, duration in calls if model == step_model][:-1]
    if len(intervals) < 2:
        return None
    return {"step_model": step_model, "steps": len(intervals) // len(rounds) + 1,
            "interval_p50_ms": float(np.median(intervals) * 1e3),
            "model_call_p50_ms": float(np.median(durations) * 1e3),
            "loop_overhead_ratio": float(np.median(intervals) / np.median(durations))}


def bench_stages(results: dict, bundle: Bundle, backends: dict[str, Backend], pipelines: list[str],
                 image_size: int, steps: int | None, repeats: int, client_loops: frozenset = frozenset()) -> None:
    """``client_loops``: backends whose pipelines must not use server-side loops (the comparison)."""
    from posterrt.runtime.pipelines import build_pipeline

    rows, hoisting = [], []
    for pipeline_name in tqdm(pipelines, desc="pipelines", unit="pipeline"):
        timed = {name: TimedBackend(backend, server_loops=name not in client_loops) for name, backend in backends.items()}
        pipes = {name: build_pipeline(pipeline_name, backend, progress=False) for name, backend in timed.items()}
        samples: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in pipes}
        rounds: dict[str, list] = {name: [] for name in pipes}
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
                rounds[name].append(list(timed[name].calls))
        for name, recorded in rounds.items():
            for model in sorted({m for calls in recorded for m, _, _ in calls if m in CONTRACTS and CONTRACTS[m].role == STEP}):
                found = step_hoisting(recorded, model)
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


class CpuMeter:
    """CPU time while a block runs, in cores busy: this machine's, and ours (this process plus the
    server's process group). On a shared machine the difference is what other jobs took."""

    def __init__(self, server_pid: int | None = None):
        import psutil

        self.psutil = psutil
        self.server = psutil.Process(server_pid) if server_pid else None

    def _ours(self) -> float:
        processes = [self.psutil.Process()]
        if self.server is not None:
            processes += [self.server, *self.server.children(recursive=True)]  # the Python-backend stubs
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except self.psutil.Error:  # a stub that exited meanwhile
                pass
        return total

    def __enter__(self):
        self.started = time.perf_counter()
        self.machine0, self.ours0 = sum(self.psutil.cpu_times()[:3]), self._ours()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.started
        self.machine_cores = (sum(self.psutil.cpu_times()[:3]) - self.machine0) / wall
        self.our_cores = (self._ours() - self.ours0) / wall


def run_clients(backend: Backend, model: str, inputs: dict, clients: int, per_client: int,
                seconds: float | None = None) -> dict:
    """``clients`` threads calling ``model`` back to back: ``per_client`` calls each, or with
    ``seconds`` as many as fit (at least ``per_client``), so fast models are timed over a window
    long enough for CPU accounting."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.perf_counter() + (seconds or 0.0)

    def client():
        mine = []
        while len(mine) < per_client or time.perf_counter() < deadline:
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


#: Server configurations of the throughput sweep: the repository's defaults with dynamic batching
#: on and off (the table of bench.md), then the levers tried (results["throughput_levers"]).
#: The queue-delay and preferred-size levers were measured and dropped (RESULTS.md, Serving); the
#: defaults give radm_head and plannet_denoiser two instances (model_config.DEFAULT_CPU_INSTANCES),
#: "1 instance" shows what that default is worth.
THROUGHPUT_CONFIGS = {
    "batching": {"dynamic_batching": True},
    "no-batching": {"dynamic_batching": False},
    "batching, 1 instance": {"dynamic_batching": True, "instances": 1},
    "batching, 2 instances": {"dynamic_batching": True, "instances": 2},
    "batching, 2 threads": {"dynamic_batching": True, "intra_op_threads": 2},
}
MAIN_CONFIGS = ("batching", "no-batching")
THROUGHPUT_WINDOW_S = 1.0  # per (configuration, model, concurrency) and round


def bench_throughput(results: dict, bundle: Bundle, stack: ExitStack, workdir: Path, concurrency: list[int],
                     repeats: int, image_size: int) -> None:
    """Requests/s of each step model against concurrent clients, per server configuration.

    One ORT thread per instance unless the configuration says otherwise. Every (configuration,
    concurrency) runs once per round, rounds interleaved; a row holds the median round."""
    models = [m for m in THROUGHPUT_MODELS if m in bundle.models]
    servers = {}
    for index, (name, overrides) in enumerate(THROUGHPUT_CONFIGS.items()):
        options = serving_options(**{"intra_op_threads": 1, **overrides})
        servers[name] = start_server(stack, bundle, workdir, f"throughput-{index}", options, models=models)
    backends = {name: stack.enter_context(open_backend(bundle, server.grpc_url, models=models))
                for name, server in servers.items()}
    samples: dict[tuple, list[dict]] = defaultdict(list)
    for model in tqdm(models, desc="throughput", unit="model"):
        inputs = sample_inputs(bundle.contract(model), bench_sizes(image_size, 1), seed=0)
        for backend in backends.values():
            run_clients(backend, model, inputs, 1, 3)  # warm-up
        for _ in range(repeats):
            for name, backend in backends.items():
                for clients in concurrency:
                    before = server_counts(servers[name].grpc_url, model)
                    with CpuMeter(servers[name].process.pid) as cpu:
                        row = run_clients(backend, model, inputs, clients, 2, seconds=THROUGHPUT_WINDOW_S)
                    after = server_counts(servers[name].grpc_url, model)
                    samples[(model, name, clients)].append(
                        {**row, "inferences": after[0] - before[0], "executions": after[1] - before[1],
                         "our_cores": cpu.our_cores, "machine_cores": cpu.machine_cores,
                         "cpu_ms_per_request": cpu.our_cores / row["rps"] * 1e3})
    main, levers = [], []
    for (model, name, clients), rounds in samples.items():
        middle = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
        overrides = THROUGHPUT_CONFIGS[name]
        row = {"model": model, "dynamic_batching": bool(overrides.get("dynamic_batching")), "concurrency": clients,
               **middle, "config": name, "rounds": len(rounds), "rps_all": [round(r["rps"], 1) for r in rounds]}
        (main if name in MAIN_CONFIGS else levers).append(row)
    results["throughput"] = main
    results["throughput_levers"] = levers


def bench_plan_loops(results: dict, bundle: Bundle, stack: ExitStack, workdir: Path, threads: int, repeats: int,
                     image_size: int) -> None:
    """The PlanNet plan (encoder + 100-step loop) by where the loop runs, interleaved:

    * the sampler alone on constant logits (what the loop costs beyond the model calls);
    * in this process: the pipeline's client loop on ONNX Runtime; the server model's loop code
      with the memory bound once (IO binding) and with a plain ``session.run`` per step;
    * Triton gRPC: client loop (one round trip per step), server loop in-process, server loop BLS.
    """
    import onnxruntime as ort

    from posterrt.runtime.pipelines.diffusion import stage_rng
    from posterrt.runtime.pipelines.plan import PlanNetPlanner
    from posterrt.runtime.server_stages import plannet as plannet_stage
    from posterrt.runtime.triton.stubs import plannet_sampler as sl
    from posterrt.runtime.triton.model import session_options

    models = ["plannet_encoder", "plannet_denoiser"]
    if any(m not in bundle.models for m in models):
        return
    request = demo_request(image_size, None)
    embedded = stack.enter_context(embedded_backend(bundle, threads))
    planner = PlanNetPlanner(embedded)
    memory = embedded.run("plannet_encoder", {"image": planner.product_pixels(request), **planner.encode_texts(request.texts)})
    fixed = planner.sampler.blank_tokens(1)
    fixed[0, 0, 0] = 0
    levels = planner.sampler.config.num_timesteps
    constant_logits = embedded.run("plannet_denoiser", {"tokens": fixed, "timestep": np.full(1, levels, np.float32), **memory})["logits"]

    session = ort.InferenceSession(str(bundle.model_path("plannet_denoiser")),
                                   session_options({"intra_op_thread_count": str(threads)}), providers=["CPUExecutionProvider"])

    class PlainDenoiser:
        def loop_call(self, memory_, memory_mask, tokens_shape):
            return lambda tokens, timestep: session.run(["logits"], {"tokens": tokens, "timestep": timestep,
                                                                     "memory": memory_, "memory_mask": memory_mask})[0]

    rows = [{**memory, "fixed_tokens": fixed, "steps": np.array([levels])}]

    def in_process(denoiser):
        return lambda: sl.run_loop(planner.sampler, denoiser, rows, [[stage_rng(0, "plan")]])

    candidates = {
        "sampler alone (constant logits)": lambda: planner.sampler.sample(lambda t, s: constant_logits, 1, stage_rng(0, "plan"),
                                                                          fixed_tokens=fixed),
        "embedded: client loop": lambda: planner(request),
        "in-process loop, IO binding (server code)": in_process(sl.InProcessDenoiser(session, planner.sampler.config.num_bins)),
        "in-process loop, session.run per step": in_process(PlainDenoiser()),
    }
    plan_models = models + [plannet_stage.NAME]
    for call in ("in-process", "bls"):
        options = serving_options(intra_op_threads=threads, extra_parameters={plannet_stage.MODEL_CALL_PARAMETER: call})
        server = start_server(stack, bundle, workdir, f"plan-{call}", options, models=plan_models)
        backend = stack.enter_context(open_backend(bundle, server.grpc_url, models=models))
        served = PlanNetPlanner(backend)
        assert served.server_loop is not None, f"the {call} server offers {plannet_stage.NAME}"
        candidates[f"triton-grpc: server loop, {call}"] = lambda served=served: served(request)
        if call == "in-process":
            client = PlanNetPlanner(backend, server_loop=False)
            candidates["triton-grpc: client loop"] = lambda client=client: client(request)
    from .timing import interleaved

    timings = interleaved(candidates, repeats=repeats, warmup=1)
    results["plan_loops"] = [{"variant": name, "steps": levels, **{k: stats[k] for k in ("p50_ms", "p90_ms", "mean_ms", "n")}}
                             for name, stats in timings.items()]


def bench_ort_settings(results: dict, bundle: Bundle, image_size: int, repeats: int) -> None:
    """One call of each step model in this process by ONNX Runtime thread setting, interleaved:
    1 thread, 2 threads without spinning (model.py's default), 2 spinning threads (ORT's default)."""
    import onnxruntime as ort

    from posterrt.runtime.triton.model import session_options

    from .timing import interleaved

    settings = {"1 thread": {"intra_op_thread_count": "1"},
                "2 threads, no spinning": {"intra_op_thread_count": "2"},
                "2 threads, spinning": {"intra_op_thread_count": "2", "allow_spinning": "1"}}
    rows = []
    for model in [m for m in ("plannet_denoiser", "radm_head", "bg_unet") if m in bundle.models]:
        inputs = sample_inputs(bundle.contract(model), bench_sizes(image_size, 1), seed=0)
        sessions = {name: ort.InferenceSession(str(bundle.model_path(model)), session_options(parameters),
                                               providers=["CPUExecutionProvider"]) for name, parameters in settings.items()}
        timings = interleaved({name: (lambda session=session: session.run(None, inputs)) for name, session in sessions.items()},
                              repeats=repeats, warmup=2)
        rows += [{"model": model, "setting": name, **{k: stats[k] for k in ("p50_ms", "p90_ms", "n")}}
                 for name, stats in timings.items()]
    results["ort_settings"] = rows


def bench_serving(results: dict, bundle: Bundle, args, serving: list[str], skip: set[str]) -> None:
    from posterrt.runtime.pipelines import PIPELINES

    from .cli import _csv, _ints

    pipelines = _csv(args.pipelines, tuple(PIPELINES), "pipelines")
    # Same ORT threads on both sides (the default: every core this process may use).
    threads = args.threads or len(os.sched_getaffinity(0))
    repeats = max(2, args.repeats)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="posterrt-bench-") as workdir:
        workdir = Path(workdir)
        backends: dict[str, Backend] = {"embedded": stack.enter_context(embedded_backend(bundle, threads))}
        client_loops = set()
        if serving and "stages" not in skip:
            server = start_server(stack, bundle, workdir, "repo", serving_options(intra_op_threads=threads))
            if "http" in serving:
                backends["triton-http"] = stack.enter_context(open_backend(bundle, server.http_url))
            if "grpc" in serving:
                backends["triton-grpc"] = stack.enter_context(open_backend(bundle, server.grpc_url))
                backends["triton-grpc-shm"] = stack.enter_context(open_backend(
                    bundle, server.grpc_url, shared_memory=True, shm_threshold_bytes=SHM_THRESHOLD_BYTES))
                if any(p in pipelines for p in ("render", "background", "layout")):  # server-side loops vs client-side
                    backends["triton-grpc-client-loop"] = backends["triton-grpc"]
                    client_loops.add("triton-grpc-client-loop")
        if "stages" not in skip:
            bench_stages(results, bundle, backends, pipelines, args.image_size, args.steps, repeats, frozenset(client_loops))
            if "grpc" in serving and "render" in pipelines:
                bench_plan_loops(results, bundle, stack, workdir, threads, repeats * 2, args.image_size)
            bench_ort_settings(results, bundle, args.image_size, repeats * 4)
        if "throughput" not in skip and "grpc" in serving:
            bench_throughput(results, bundle, stack, workdir, _ints(args.concurrency, "concurrency"), repeats,
                             args.image_size)
    results["targets"] = check_targets(results)
    results.setdefault("notes", []).extend(target_notes(results["targets"]))


# -- the targets, checked on one run ------------------------------------------------------
#: (pipeline, stage) -> the most Triton gRPC may take, as a multiple of embedded (issue 8, target 2)
OVERHEAD_LIMITS = {("background", "end_to_end"): 1.05, ("render", "end_to_end"): 1.05,
                   ("layout", "end_to_end"): 1.15, ("render", "plan"): 1.15}
BATCHING_GAIN = 1.5  # target 3: throughput at concurrency 4 over concurrency 1, dynamic batching on
HOISTING_LIMIT = 1.05  # target 4: per-step interval over the step model's own call


def check_targets(results: dict) -> list[dict]:
    """Each target of issue 8 that this run measured: value, limit, met."""
    found = []
    stages = {(r["pipeline"], r["stage"], r["backend"]): r for r in results.get("stages", [])}
    for (pipeline, stage), limit in OVERHEAD_LIMITS.items():
        for backend in ("triton-grpc", "triton-grpc-shm", "triton-grpc-client-loop"):
            row = stages.get((pipeline, stage, backend))
            if row and row.get("ratio_to_embedded") is not None:
                found.append({"target": 2, "what": f"{pipeline} {stage}, {backend} / embedded (p50)",
                              "value": row["ratio_to_embedded"], "limit": limit, "met": row["ratio_to_embedded"] <= limit})
    rps = {(r["model"], r["concurrency"]): r["rps"] for r in results.get("throughput", []) if r["dynamic_batching"]}
    for model in THROUGHPUT_MODELS:
        if (model, 1) in rps and (model, 4) in rps:
            gain = rps[(model, 4)] / rps[(model, 1)]
            found.append({"target": 3, "what": f"{model}: requests/s at concurrency 4 / concurrency 1, dynamic batching",
                          "value": gain, "limit": BATCHING_GAIN, "met": gain >= BATCHING_GAIN})
    for row in results.get("step_hoisting", []):
        found.append({"target": 4, "what": f"{row['pipeline']} {row['step_model']} on {row['backend']}: step interval / call",
                      "value": row["loop_overhead_ratio"], "limit": HOISTING_LIMIT,
                      "met": row["loop_overhead_ratio"] <= HOISTING_LIMIT})
    return found


def target_notes(targets: list[dict]) -> list[str]:
    return [f"target {t['target']}: {t['what']} = {t['value']:.3f} ({'>=' if t['target'] == 3 else '<='} "
            f"{t['limit']:g}: {'met' if t['met'] else 'NOT met'})" for t in targets]


def serving_markdown(results: dict) -> str:
    """The measured part of RESULTS.md's Serving section, from one run's bench.json."""
    lines = [f"Command: `{results.get('command')}`  ", f"Date: {results.get('date')}; machine: "
             f"{results.get('machine', {}).get('cpu')}, {results.get('machine', {}).get('cores')} cores (shared)", "",
             "| target | measured | value | limit | met |", "|---|---|---|---|---|"]
    for t in results.get("targets", []):
        lines.append(f"| {t['target']} | {t['what']} | {t['value']:.3f} | {t['limit']:g} | {'yes' if t['met'] else 'no'} |")
    if results.get("plan_loops"):
        lines += ["", "PlanNet plan (encoder + loop), by where the loop runs (p50 over interleaved rounds):", "",
                  "| variant | p50 ms | p90 ms | n |", "|---|---|---|---|"]
        for row in results["plan_loops"]:
            lines.append(f"| {row['variant']} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['n']} |")
    if results.get("ort_settings"):
        lines += ["", "ONNX Runtime thread settings, one call in-process (p50 ms, interleaved):", "",
                  "| model | setting | p50 ms | p90 ms | n |", "|---|---|---|---|---|"]
        for row in results["ort_settings"]:
            lines.append(f"| {row['model']} | {row['setting']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['n']} |")
    rows = results.get("throughput", []) + results.get("throughput_levers", [])
    if rows:
        lines += ["", "Throughput (median round; all rounds' requests/s in brackets; cores busy: ours = bench "
                  "client + server + stubs, machine = everything):", "",
                  "| model | server config | concurrency | requests/s | p50 ms | batched | CPU ms/request | "
                  "cores: ours / machine |", "|---|---|---|---|---|---|---|---|"]
        for row in sorted(rows, key=lambda r: (r["model"], list(THROUGHPUT_CONFIGS).index(r["config"]), r["concurrency"])):
            lines.append(f"| {row['model']} | {row['config']} | {row['concurrency']} | {row['rps']:.1f} "
                         f"{row['rps_all']} | {row['p50_ms']:.1f} | {row['inferences']}/{row['executions']} | "
                         f"{row['cpu_ms_per_request']:.2f} | {row['our_cores']:.2f} / {row['machine_cores']:.2f} |")
    return "\n".join(lines) + "\n"
