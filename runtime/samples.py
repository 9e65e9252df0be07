"""Random inputs that satisfy a contract: for parity checks, warm-up, benchmarks and perf_analyzer data."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .contracts import DYNAMIC_DIMS, ModelContract, TensorSpec


def default_sizes(kind: str = "opt", dims: Mapping = DYNAMIC_DIMS) -> dict[str, int]:
    """Sizes for every dynamic axis.

    ``opt``: the profile's optimum. ``small``/``other``: the two sizes parity checks run at; they
    differ in every axis and from the tracing size ``trace``, so an export that baked a traced
    size into the graph fails parity.
    """
    sizes = {}
    for name, rng in dims.items():
        step = max(1, rng.multiple_of)
        value = {"opt": rng.opt, "small": rng.min, "other": rng.min + step, "trace": rng.min + 2 * step}[kind]
        sizes[name] = min(value, rng.max)
    return sizes


def sample_tensor(spec: TensorSpec, sizes: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """One random tensor within the spec's value bounds. ``spec`` must be resolved."""
    shape = spec.concrete_shape(sizes)
    if spec.np_dtype.kind in "iu":
        low = int(spec.low or 0)
        high = int(spec.high) if spec.high is not None else 100
        array = rng.integers(low, high, size=shape)
        if spec.name.endswith("mask") and array.ndim >= 1:
            array[..., 0] = 1  # a padding mask keeps at least one real token
        return array.astype(spec.np_dtype)
    if spec.name.endswith("mask") and spec.low == 0 and spec.high == 1:
        array = (rng.random(shape) > 0.3).astype(spec.np_dtype)
        if array.ndim >= 2 and array.shape[1] > 1:
            array[:, 0, ...] = 1  # at least one real line/token per sample
        return array
    if spec.low is not None and spec.high is not None:
        return rng.uniform(spec.low, spec.high, size=shape).astype(spec.np_dtype)
    return rng.standard_normal(shape).astype(spec.np_dtype)


def sample_inputs(contract: ModelContract, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: sample_tensor(spec, sizes, rng) for spec in contract.inputs}
