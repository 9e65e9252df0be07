"""The PyTorch reference as a backend: the same ``run(model, inputs)`` as ONNX Runtime or Triton,
executed by the family's torch module. Parity tests run a whole pipeline on both and compare.

Each model's module is built the way the exporter built it (``family.build(model, preset, sources)``,
deterministic for a preset without checkpoints), so for a bundle exported without checkpoints the
two backends hold the same weights.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from posterrt.runtime.backends.base import Backend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import ModelContract
from posterrt.runtime.errors import BackendError

from .bundle_writer import Sources
from .registry import MODEL_FAMILY, family_module


class TorchBackend(Backend):
    def __init__(self, bundle: Bundle, sources: Sources | None = None):
        super().__init__(bundle)
        self.sources = sources or Sources()
        self._modules: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def module(self, model: str) -> torch.nn.Module:
        with self._lock:
            if model not in self._modules:
                exportable = family_module(MODEL_FAMILY[model]).build(model, self.bundle.preset, self.sources)
                recorded = self.bundle.models[model].static_dims
                if {k: int(v) for k, v in exportable.static_dims.items()} != {k: int(v) for k, v in recorded.items()}:
                    raise BackendError(f"model {model!r}: the reference module has static dims {exportable.static_dims}, "
                                       f"the bundle recorded {recorded}; the bundle was exported from other sources")
                self._modules[model] = exportable.module.eval()
            return self._modules[model]

    def _run(self, contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self.module(contract.name)
        with torch.no_grad():
            outputs = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in contract.input_names))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: tensor.numpy() for name, tensor in zip(contract.output_names, outputs)}

    def close(self) -> None:
        self._modules.clear()
