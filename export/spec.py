"""What a network family hands the exporter for one served model (Optimum's export config, torch side).

The tensor names, dtypes and dynamic axes come from the model's contract; an Exportable only adds
the torch module, the static sizes its config fixes, and the inputs that random numbers cannot
fake (valid boxes, for instance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from posterrt.runtime.contracts import ModelContract, get_contract
from posterrt.runtime.samples import sample_inputs

#: fp32 parity: max |onnx - torch| over max |torch|, per output. 1e-4 leaves room for the
#: reassociation ONNX Runtime's fused kernels do, and is 100x below what fp16 would show.
FP32_RTOL = 1e-4


@dataclass
class Exportable:
    name: str
    module: torch.nn.Module  # forward(*inputs in contract order) -> tuple of outputs in contract order
    static_dims: dict  # values of the contract's static symbols for this config
    config: dict  # JSON-able config of the family (recorded in the manifest)
    #: overrides some sample inputs: f(sizes, rng, resolved_contract) -> {name: array}
    input_overrides: Callable[[Mapping[str, int], np.random.Generator, ModelContract], dict] | None = None
    rtol: float = FP32_RTOL
    #: sizes for dynamic axes this model constrains (e.g. a fixed image size)
    size_overrides: dict = field(default_factory=dict)
    #: f(output_name, expected) -> bool array of the entries that set an output's scale in the parity
    #: check (default: all). Constants by design (logits masked to -1e4) would otherwise dwarf the error.
    parity_scale_mask: Callable[[str, np.ndarray], np.ndarray] | None = None

    @property
    def contract(self) -> ModelContract:
        return get_contract(self.name).resolve(self.static_dims)

    def inputs(self, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
        sizes = {**sizes, **self.size_overrides}
        contract = self.contract
        arrays = sample_inputs(contract, sizes, seed)
        if self.input_overrides is not None:
            arrays.update(self.input_overrides(sizes, np.random.default_rng(seed + 7919), contract))
        return arrays


class ContractModule(torch.nn.Module):
    """Adapts a module whose forward returns a dict or a single tensor to the contract's output order."""

    def __init__(self, inner: torch.nn.Module, output_names):
        super().__init__()
        self.inner = inner
        self.output_names = list(output_names)

    def forward(self, *args):
        out = self.inner(*args)
        if isinstance(out, dict):
            return tuple(out[n] for n in self.output_names)
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(out)
