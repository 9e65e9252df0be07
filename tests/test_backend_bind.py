"""Backend.bind: step-invariant inputs checked once, per-step inputs checked in full every step
(their sizes against the bound ones too), the bound values copied, wrappers that override ``run``
still seeing every step. A stand-in backend on the real plannet_denoiser contract: no files needed."""
from __future__ import annotations

import numpy as np
import pytest

from posterrt.runtime.backends import base
from posterrt.runtime.backends.base import Backend
from posterrt.runtime.contracts import PLANNET_DENOISER
from posterrt.runtime.errors import ContractError

STATIC = {"max_elements": 4, "plan_dim": 8, "plan_vocab_size": 17, "plan_num_bins": 16}


class EchoBackend(Backend):
    """Records each executed call's inputs and answers zero logits of the right shape."""

    def __init__(self):
        super().__init__(bundle=None)
        self.executed = []

    def contract(self, model):
        assert model == PLANNET_DENOISER.name
        return PLANNET_DENOISER.resolve(STATIC)

    def _run(self, contract, inputs):
        self.executed.append(inputs)
        tokens = inputs["tokens"]
        return {"logits": np.zeros((*tokens.shape, STATIC["plan_num_bins"]), np.float32)}


class TimingWrapper(EchoBackend):
    """Overrides ``run`` only, as the benchmark's TimedBackend did before it learned ``bind``."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def run(self, model, inputs):
        self.runs += 1
        return super().run(model, inputs)


def memory(batch=1, tokens=3) -> dict:
    rng = np.random.default_rng(0)
    return {"memory": rng.standard_normal((batch, tokens, STATIC["plan_dim"])).astype(np.float32),
            "memory_mask": np.ones((batch, tokens), np.float32)}


def step_inputs(batch=1, level=10.0) -> dict:
    return {"tokens": np.full((batch, STATIC["max_elements"], 5), 16, np.int64),
            "timestep": np.full(batch, level, np.float32)}


def test_bound_inputs_are_validated_once_and_per_step_inputs_every_step(monkeypatch):
    validated = []
    real = base.validate_inputs
    monkeypatch.setattr(base, "validate_inputs",
                        lambda contract, inputs: (validated.append(sorted(inputs)), real(contract, inputs))[1])
    backend = EchoBackend()
    step = backend.bind("plannet_denoiser", memory())
    for level in (3.0, 2.0, 1.0):
        assert step(step_inputs(level=level))["logits"].shape == (1, 4, 5, 16)
    assert validated == [["memory", "memory_mask"]] + [["timestep", "tokens"]] * 3
    assert sorted(backend.executed[0]) == ["memory", "memory_mask", "timestep", "tokens"]


def test_bad_inputs_fail_where_they_are_given():
    backend = EchoBackend()
    bad_memory = memory()
    bad_memory["memory"][0, 1, 2] = np.nan
    with pytest.raises(ContractError, match="input 'memory': contains NaN"):
        backend.bind("plannet_denoiser", bad_memory)
    with pytest.raises(ContractError, match="cannot bind unknown inputs \\['memroy'\\]"):
        backend.bind("plannet_denoiser", {"memroy": memory()["memory"]})

    step = backend.bind("plannet_denoiser", memory())
    out_of_vocabulary = step_inputs()
    out_of_vocabulary["tokens"][0, 0, 0] = 17
    with pytest.raises(ContractError, match="input 'tokens': values must be < 17"):
        step(out_of_vocabulary)
    with pytest.raises(ContractError, match="input 'timestep': contains NaN"):
        step({**step_inputs(), "timestep": np.full(1, np.nan, np.float32)})
    with pytest.raises(ContractError, match="input 'tokens': axis 0 \\(batch\\) is 2, but the bound inputs have batch=1"):
        step(step_inputs(batch=2))
    with pytest.raises(ContractError, match="unexpected inputs \\['memory'\\]"):
        step({**step_inputs(), "memory": memory()["memory"]})
    with pytest.raises(ContractError, match="missing inputs \\['timestep'\\]"):
        step({"tokens": step_inputs()["tokens"]})
    assert backend.executed == []


def test_bound_values_are_a_copy_of_what_was_checked():
    backend = EchoBackend()
    given = memory()
    original = given["memory"].copy()
    step = backend.bind("plannet_denoiser", given)
    given["memory"][:] = np.nan  # the caller reuses its buffer after binding
    step(step_inputs())
    np.testing.assert_array_equal(backend.executed[0]["memory"], original)


def test_a_wrapper_overriding_run_sees_every_step():
    wrapper = TimingWrapper()
    step = wrapper.bind("plannet_denoiser", memory())
    for _ in range(4):
        step(step_inputs())
    assert wrapper.runs == 4 and len(wrapper.executed) == 4
