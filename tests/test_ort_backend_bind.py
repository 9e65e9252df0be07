"""OrtBackend.bind runs a loop's steps through ONNX Runtime's IO binding (step-invariant inputs
bound once): the same numbers as run() with all inputs, every step validated, bound inputs kept
alive by the bound call itself."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.errors import ContractError
from posterrt.runtime.samples import default_sizes, sample_inputs

STEP_INPUTS = ("sample", "timestep")


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    with OrtBackend(Bundle(tiny_bundle), intra_op_threads=1) as backend:
        yield backend


def test_bound_steps_equal_full_runs(backend):
    contract = backend.contract("bg_unet")
    requests = [sample_inputs(contract, default_sizes("small"), seed) for seed in (11, 12, 13)]
    fixed = {k: v for k, v in requests[0].items() if k not in STEP_INPUTS}
    step = backend.bind("bg_unet", {k: v.copy() for k, v in fixed.items()})
    gc.collect()  # the caller's copies are gone: the bound call must hold what it bound
    for inputs in requests:  # other latents and timesteps each step, the same conditioning
        per_step = {k: inputs[k] for k in STEP_INPUTS}
        expected = backend.run("bg_unet", {**fixed, **per_step})["noise_pred"]
        np.testing.assert_array_equal(step(per_step)["noise_pred"], expected)


def test_bound_steps_are_validated(backend):
    contract = backend.contract("bg_unet")
    inputs = sample_inputs(contract, default_sizes("small"), 5)
    step = backend.bind("bg_unet", {k: v for k, v in inputs.items() if k not in STEP_INPUTS})
    bad = {k: inputs[k] for k in STEP_INPUTS}
    bad["sample"] = bad["sample"].copy()
    bad["sample"][0, 0, 0, 0] = np.nan
    with pytest.raises(ContractError, match="sample"):
        step(bad)
    with pytest.raises(ContractError, match="timestep"):
        step({"sample": inputs["sample"], "timestep": inputs["timestep"].astype(np.float64)})
