"""Latency measurement: warm-up, then the candidates interleaved round by round, so a slow phase
of the machine (another process, thermal) hits every candidate alike and ratios stay fair."""
from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np


def summarize(seconds: list[float]) -> dict:
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "n": int(values.size),
        "mean_ms": float(values.mean()),
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "min_ms": float(values.min()),
    }


def interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
                min_seconds: float = 0.0) -> dict[str, dict]:
    """Time each zero-argument callable ``repeats`` times (at least ``min_seconds`` in all), alternating."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - started < min_seconds:
        for name, run in candidates.items():
            begin = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: summarize(values) for name, values in samples.items()}
