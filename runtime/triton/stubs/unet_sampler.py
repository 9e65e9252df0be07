"""The stub of ``bg_unet_sampler`` and ``render_unet_sampler`` (runtime/server_stages/unet.py): a
UNet's whole denoising loop in the server.

How: the stub runs posterrt's own ``denoise`` (the pipelines' loop, not a copy) with posterrt's
numpy schedulers, over the UNet:

* ``in-process`` (default for UNet files under :data:`IN_PROCESS_LIMIT_BYTES`): the stub opens the
  UNet's file itself (the embedded ONNX Runtime backend over the stage's small bundle, OpenVINO for
  an IR variant), exactly what the served UNet runs. Its weights are then in memory twice;
* ``bls``: one business-logic-scripting call per step to the served UNet; no second copy of the
  weights (a paper-size UNet is 3.4-4.9 GB), one hop between stubs per step.
"""
from __future__ import annotations

import numpy as np

from posterrt.runtime.contracts import get_contract
from posterrt.runtime.errors import BackendError
from posterrt.runtime.pipelines.diffusion import denoise
from posterrt.runtime.schedulers import get_scheduler
from posterrt.runtime.server_stages.rng import generator_from_state, generator_state
from posterrt.runtime.triton.stubs.requests import RequestError, answer_each, open_stage

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: unit tests with a stand-in
    pb_utils = None

#: the request's per-row settings; its other inputs are the UNet's step-invariant inputs
LOOP_INPUTS = ("latents", "steps", "guidance", "scheduler", "cache_interval", "rng_state")


class BlsUnet:
    """What ``denoise`` needs of a backend (``bind``), over the served UNet: one
    business-logic-scripting request per step."""

    def __init__(self, stage: str):
        self.stage = stage

    def bind(self, model: str, fixed: dict):
        from posterrt.runtime.triton.model_config import to_wire

        contract = get_contract(model)
        output_names = contract.output_names
        fixed_tensors = [pb_utils.Tensor(name, to_wire(contract.input(name), array)) for name, array in fixed.items()]

        def step(inputs: dict) -> dict:
            tensors = [pb_utils.Tensor(name, to_wire(contract.input(name), array)) for name, array in inputs.items()]
            response = pb_utils.InferenceRequest(model_name=model, requested_output_names=output_names,
                                                 inputs=[*tensors, *fixed_tensors]).exec()
            if response.has_error():
                raise BackendError(f"{self.stage}: {model} failed: {response.error().message()}")
            return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names}

        return step


def run_row(engine, unet: str, settings: dict, inputs: dict, row: int) -> tuple[np.ndarray, np.ndarray]:
    """One poster's loop: (denoised latents [1, ...], the generator's final state)."""
    guidance = float(inputs["guidance"][row])
    fixed = {name: np.ascontiguousarray(array[row]) for name, array in inputs.items() if name not in LOOP_INPUTS}
    expected = 2 if guidance > 1 else 1
    if any(array.shape[0] != expected for array in fixed.values()):
        raise RequestError(f"model {unet + '_sampler'!r}: guidance {guidance:g} needs the step-invariant inputs "
                           f"batched for guidance ({expected} per row), got {sorted({a.shape[0] for a in fixed.values()})}")
    scheduler = get_scheduler(settings["schedulers"][int(inputs["scheduler"][row])], settings["scheduler_config"])
    generator = generator_from_state(inputs["rng_state"][row])
    latents = denoise(engine, unet, scheduler, inputs["latents"][row:row + 1], int(inputs["steps"][row]),
                      guidance, fixed, generator, interval=int(inputs["cache_interval"][row]))
    return latents, generator_state(generator)


class TritonPythonModel:
    def initialize(self, args):
        folder = open_stage(args)
        self.settings = folder.settings
        (self.unet,) = folder.stage.models
        self.contract = folder.contract
        self.decoupled = folder.decoupled
        self.stage = folder.stage.progress_stage
        self.engine = BlsUnet(folder.stage.name) if folder.model_call == "bls" else folder.in_process_backend()

    def execute(self, requests):  # no dynamic batching: each request's rows run one after another
        return answer_each(pb_utils, requests, self.contract, self.denoise_rows, self.decoupled,
                           self.stage)

    def denoise_rows(self, inputs: dict) -> dict:
        rows = [run_row(self.engine, self.unet, self.settings, inputs, row) for row in range(len(inputs["steps"]))]
        return {"denoised": np.concatenate([latents for latents, _ in rows]),
                "final_rng_state": np.stack([state for _, state in rows])}

    def finalize(self):
        if hasattr(self.engine, "close"):
            self.engine.close()
        self.engine = None
