"""The one interface every backend implements: run model NAME on named numpy inputs, get named outputs.

Pipelines talk only to this; the in-process ONNX Runtime backend and the Triton client slot in
without the pipelines changing. Inputs are checked against the model's contract before they leave
the process, so a bad tensor fails here with the tensor's name instead of deep inside a library.

A denoising loop calls one model many times with some inputs unchanged (an encoder's memory):
``bind`` checks those once and returns a per-step call that checks only what changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Callable, Mapping

import numpy as np

from ..bundle import Bundle
from ..contracts import ModelContract, validate_inputs
from ..errors import ContractError

#: ``step(inputs) -> outputs``: one call of a model whose step-invariant inputs are bound
StepCall = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class Backend(ABC):
    """Runs served models of one bundle. Thread-safe: services call ``run`` from many threads."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._contracts: dict[str, ModelContract] = {}

    def contract(self, model: str) -> ModelContract:
        if model not in self._contracts:
            self._contracts[model] = self.bundle.contract(model)
        return self._contracts[model]

    def run(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.contract(model)
        validate_inputs(contract, inputs)
        return self._run(contract, dict(inputs))

    def bind(self, model: str, fixed_inputs: Mapping[str, np.ndarray]) -> StepCall:
        """``model`` with its step-invariant inputs bound: returns ``step(inputs) -> outputs`` for a loop,
        ``inputs`` being the other inputs of the contract.

        ``fixed_inputs`` are validated here, once, and copied, so that what was checked is what runs
        at every step. Each step validates its own inputs in full, and that their dynamic sizes
        (``batch``, ...) agree with the bound inputs', as one ``run`` with all inputs would.
        A subclass that overrides ``run`` (a wrapper that times or counts calls) gets every step
        through its ``run``, with the bound inputs re-validated, unless it overrides ``bind`` too.
        """
        contract = self.contract(model)
        unknown = [name for name in fixed_inputs if name not in contract.input_names]
        if unknown:
            raise ContractError(f"model {model!r}: cannot bind unknown inputs {unknown}; it has {contract.input_names}")
        validate = replace(contract, inputs=tuple(spec for spec in contract.inputs if spec.name in fixed_inputs))
        bound_sizes = validate_inputs(validate, fixed_inputs)
        fixed = {name: np.array(array, copy=True) for name, array in fixed_inputs.items()}
        if type(self).run is not Backend.run:
            return lambda inputs: self.run(model, {**inputs, **fixed})

        per_step = replace(contract, inputs=tuple(spec for spec in contract.inputs if spec.name not in fixed))
        # (input, axis, symbol, size) of every per-step axis whose size the bound inputs fixed
        shared = [(spec.name, axis, symbol, bound_sizes[symbol]) for spec in per_step.inputs
                  for axis, symbol in enumerate(spec.shape) if symbol in bound_sizes]

        execute = self._bound_run(contract, fixed)

        def step(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            validate_inputs(per_step, inputs)
            for name, axis, symbol, size in shared:
                if inputs[name].shape[axis] != size:
                    raise ContractError(f"model {model!r} input {name!r}: axis {axis} ({symbol}) is "
                                        f"{inputs[name].shape[axis]}, but the bound inputs have {symbol}={size}")
            return execute(inputs)

        return step

    def _bound_run(self, contract: ModelContract, fixed: dict[str, np.ndarray]) -> StepCall:
        """Execute validated steps with ``fixed`` (validated, copied) bound. Backends that can keep
        the bound inputs where the engine reads them (ONNX Runtime's IO binding) override this."""
        return lambda inputs: self._run(contract, {**inputs, **fixed})

    @abstractmethod
    def _run(self, contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute one validated call; returns every output of the contract by name."""

    def server_stage(self, name: str):
        """A client for the server stage ``name`` (runtime/server_stages) when this backend runs that
        part of the pipeline in its server, else None: the pipeline runs it here, step by step.
        Called with the pipeline's own arguments, the client returns what the pipeline's code
        returns. In-process backends have no server: None."""
        return None

    def close(self) -> None:
        """Release sessions / connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
