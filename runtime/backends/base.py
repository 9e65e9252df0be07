"""The one interface every backend implements: run model NAME on named numpy inputs, get named outputs.

Pipelines talk only to this; the in-process ONNX Runtime backend and the Triton client slot in
without the pipelines changing. Inputs are checked against the model's contract before they leave
the process, so a bad tensor fails here with the tensor's name instead of deep inside a library.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from ..bundle import Bundle
from ..contracts import ModelContract, validate_inputs


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

    @abstractmethod
    def _run(self, contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute one validated call; returns every output of the contract by name."""

    def close(self) -> None:
        """Release sessions / connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
