"""Each pipeline end to end, the way a user pays for it: the embedded runtime (ONNX Runtime on the
bundle, optionally with gated variants and the UNet feature cache) beside the PyTorch reference backend
(``export/torch_backend.py``: the family modules, fp32, eager), same requests (seed, steps, size),
interleaved round by round so a busy moment of the shared machine slows both alike.

Each run is broken down from the model calls it makes (their contract roles) and its stage timings:

* prologue / loop / epilogue: time inside the models of that role (encoders / denoisers / decoders);
* composition: the ``compose`` stage (texts drawn into their boxes, the logo pasted);
* other: the rest of the wall time: samplers, image pre/post-processing, Python between the calls.

Peak memory: each backend runs every pipeline once in a process of its own (``--memory``), whose peak
resident set size is what that backend needs to hold the pipelines' models at once.

    python -m posterrt.benchmarks.e2e --bundle bundles/tiny --steps 30 --rounds 3 --out results/e2e.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import EPILOGUE, PROLOGUE, STEP, parse_variant_list
from posterrt.runtime.pipelines import build_pipeline
from posterrt.runtime.pipelines.request import parse_size

from .machine import describe
from .serving import TimedBackend, demo_request, embedded_backend

PIPELINES = ("poster", "background", "render", "layout")
PARTS = ("prologue", "loop", "epilogue", "composition", "other")
ROLE_PART = {PROLOGUE: "prologue", STEP: "loop", EPILOGUE: "epilogue"}


def open_side(bundle: Bundle, side: str, threads: int, variants: dict | None = None):
    """The backend of one side, wrapped so its model calls are timed."""
    if side == "embedded":
        inner = embedded_backend(bundle, threads, variants)
    else:
        import torch

        from posterrt.export.torch_backend import TorchBackend

        torch.set_num_threads(threads)
        inner = TorchBackend(bundle)
    return TimedBackend(inner, server_loops=False)


def covered_seconds(spans: list[tuple[float, float]]) -> float:
    """Wall time covered by ``(start, seconds)`` spans: overlapping calls count once (the pipelines run a
    request's independent prologue calls side by side, ``diffusion.run_side_by_side``)."""
    covered, reach = 0.0, float("-inf")
    for start, seconds in sorted(spans):
        end = start + seconds
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def breakdown(backend: TimedBackend, result, wall_s: float) -> dict:
    """Seconds per part (module doc) of one pipeline run whose model calls ``backend`` recorded: the
    wall time that calls of each role cover, so calls that overlap are not counted twice."""
    spans = {part: [] for part in PARTS}
    for model, started, seconds in backend.calls:
        spans[ROLE_PART[backend.contract(model).role]].append((started, seconds))
    parts = {part: covered_seconds(spans[part]) for part in PARTS}
    parts["composition"] = float(result.timings.get("compose", 0.0))
    parts["other"] = max(0.0, wall_s - sum(parts.values()))
    return {"total": wall_s, **parts}


def run_once(pipeline, backend: TimedBackend, request) -> dict:
    backend.calls.clear()
    started = time.perf_counter()
    result = pipeline(request)
    return breakdown(backend, result, time.perf_counter() - started)


def make_request(size: int | tuple[int, int], steps: int | None, seed: int, cache_interval: int | None = None):
    """The demo request at ``size`` (square side, or (width, height))."""
    width, height = (size, size) if isinstance(size, int) else size
    request = demo_request(width, steps, seed)
    request.size, request.cache_interval = (width, height), cache_interval
    return request


def sides_of(cache_intervals=(1,)) -> list[tuple[str, str, int]]:
    """(label, backend, cache interval) of each side: the PyTorch reference (never cached) and one
    embedded side per interval, so cached and uncached posters are timed in the same rounds."""
    return [("torch", "torch", 1)] + [("embedded" if n == 1 else f"embedded N={n}", "embedded", n)
                                      for n in dict.fromkeys(cache_intervals)]


def measure(bundle_dir, pipelines=PIPELINES, size: int | tuple[int, int] = 512, steps: int | None = None, rounds: int = 3,
            warmup: int = 1, threads: int = 2, seed: int = 0, variants: dict | None = None,
            cache_intervals=(1,), warmup_steps: int | None = None, progress: bool = True) -> dict:
    """Interleaved rounds of every pipeline on every side (:func:`sides_of`). Warm-up rounds run
    ``warmup_steps`` steps (default: ``steps``): they load the sessions and size the allocators,
    which a few steps do as well as thirty at paper size."""
    bundle = Bundle(bundle_dir)
    sides = sides_of(cache_intervals)
    backends = {kind: open_side(bundle, kind, threads, variants if kind == "embedded" else None)
                for kind in dict.fromkeys(kind for _, kind, _ in sides)}
    runners = {(name, label): (build_pipeline(name, backends[kind], progress=False), backends[kind], interval)
               for name in pipelines for label, kind, interval in sides}
    samples = {key: [] for key in runners}
    bar = tqdm(total=(warmup + rounds) * len(runners), desc="e2e", unit="run", disable=not progress)
    for index in range(warmup + rounds):
        run_steps = warmup_steps if index < warmup and warmup_steps is not None else steps
        for (name, label), (pipeline, backend, interval) in runners.items():
            bar.set_postfix_str(f"{name} {label}")
            figures = run_once(pipeline, backend, make_request(size, run_steps, seed, interval))
            if index >= warmup:
                samples[(name, label)].append(figures)
            bar.update()
    bar.close()
    table = {}
    for name in pipelines:
        table[name] = {label: summarize(samples[(name, label)]) for label, _, _ in sides}
        table[name]["speedup_p50"] = {label: table[name]["torch"]["total_p50_s"] / table[name][label]["total_p50_s"]
                                      for label, kind, _ in sides if kind == "embedded"}
    return table


def summarize(runs: list[dict]) -> dict:
    """p50 of the total, the mean of each part, and the share of the wall time outside any model call."""
    totals = [r["total"] for r in runs]
    means = {part: float(np.mean([r[part] for r in runs])) for part in PARTS}
    mean_total = float(np.mean(totals))
    return {"total_p50_s": float(np.median(totals)), "total_min_s": float(np.min(totals)), "runs": len(runs),
            "mean_s": means, "not_model_share": (means["composition"] + means["other"]) / mean_total}


# ---------------------------------------------------------------------------------------------
# Peak memory: one process per backend
# ---------------------------------------------------------------------------------------------
def _memory_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB. Not ``ru_maxrss``: Linux carries that over exec, so a
    spawned child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_child(bundle_dir, kind, pipelines, size, steps, threads, seed, variants, cache_interval, queue) -> None:
    bundle = Bundle(bundle_dir)
    backend = open_side(bundle, kind, threads, variants)
    before = _memory_kib("VmRSS")  # libraries imported, no model loaded yet (sessions open on first use)
    for name in pipelines:
        build_pipeline(name, backend, progress=False)(make_request(size, steps, seed, cache_interval))
    queue.put({"peak_rss_gb": _memory_kib("VmHWM") / 2 ** 20, "before_models_gb": before / 2 ** 20})


def peak_memory(bundle_dir, kind: str, pipelines=PIPELINES, size: int | tuple[int, int] = 512, steps: int | None = None,
                threads: int = 2, seed: int = 0, variants: dict | None = None, cache_interval: int = 1) -> dict:
    """Peak resident memory of a fresh process that runs every pipeline once on one side (``kind``
    ``embedded`` or ``torch``). A few steps reach the peak as well as thirty: every model is loaded
    and every buffer sized by the first full (and, cached, the first shallow) step."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_rss_child, args=(str(bundle_dir), kind, tuple(pipelines), size, steps, threads,
                                                          seed, variants if kind == "embedded" else None,
                                                          cache_interval, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def markdown(record: dict) -> str:
    lines = ["| pipeline | backend | p50 s | prologue | loop | epilogue | composition | other | not a model call |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in record["table"].items():
        for label, entry in row.items():
            if label == "speedup_p50":
                continue
            parts = " | ".join(f"{entry['mean_s'][p]:.3f}" for p in PARTS)
            lines.append(f"| {name} | {label} | {entry['total_p50_s']:.3f} | {parts} | {entry['not_model_share']:.1%} |")
        for label, speedup in row["speedup_p50"].items():
            lines.append(f"| {name} | torch / {label} | {speedup:.2f}x | | | | | | |")
    for side, memory in record.get("memory", {}).items():
        lines.append(f"\npeak RSS {side}: {memory['peak_rss_gb']:.2f} GB (before loading models "
                     f"{memory['before_models_gb']:.2f} GB)")
    return "\n".join(lines)


def parse_intervals(text: str) -> list[int]:
    """``--cache-interval``: the bench CLI's integer list (``cli._ints``), its error as the exit message."""
    from posterrt.runtime.errors import InputError

    from .cli import _ints

    try:
        return _ints(text, "cache-interval")
    except InputError as error:
        raise SystemExit(str(error)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--size", default="512x512", help="poster size WIDTHxHEIGHT (default 512x512)")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (default: the bundle's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", help="embedded side: MODEL=VARIANT,... (gated variants of the bundle)")
    parser.add_argument("--cache-interval", default="1",
                        help="embedded sides' UNet feature cache intervals, e.g. 1,3: one embedded side each (1 = off)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of the warm-up rounds and of the --memory runs (default: --steps)")
    parser.add_argument("--memory", action="store_true", help="also measure each backend's peak RSS in its own process")
    parser.add_argument("--out", type=Path, help="JSON file for the figures, the command and the machine")
    args = parser.parse_args(argv)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    variants = parse_variant_list(args.variants)
    intervals = parse_intervals(args.cache_interval)
    settings = dict(size=parse_size(args.size), steps=args.steps, threads=args.threads, seed=args.seed, variants=variants)
    record = {"command": "python -m posterrt.benchmarks.e2e " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": describe(measure_peak=False), "bundle_preset": Bundle(args.bundle).preset,
              "settings": {**settings, "cache_intervals": intervals, "rounds": args.rounds, "warmup": args.warmup,
                           "warmup_steps": args.warmup_steps},
              "table": measure(args.bundle, pipelines, rounds=args.rounds, warmup=args.warmup, cache_intervals=intervals,
                               warmup_steps=args.warmup_steps, **settings)}
    if args.memory:
        memory_settings = {**settings, "steps": args.warmup_steps or args.steps}
        record["memory"] = {label: peak_memory(args.bundle, kind, pipelines, cache_interval=interval, **memory_settings)
                            for label, kind, interval in sides_of(intervals)}
    print(markdown(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
