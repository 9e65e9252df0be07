"""A UNet's whole denoising loop run inside Triton: the Python-backend models ``bg_unet_sampler``
and ``render_unet_sampler``.

Why: a client-side loop pays a gRPC round trip and a Python-backend hop per step, about 2 ms on
this machine; against a 57 ms tiny UNet step that is the 4-5% by which Triton end to end exceeded
in-process for the background pipeline (benchmarks/RESULTS.md, Serving). With the loop in the
server a request's background costs the prologue calls, one loop call and the decode.

How: the stub runs posterrt's own ``denoise`` (the pipelines' loop, not a copy) with posterrt's
numpy schedulers, over the UNet it serves:

* ``in-process`` (default for UNet files under :data:`IN_PROCESS_LIMIT_BYTES`): the stub opens the
  UNet's file itself (ONNX Runtime with IO binding, or OpenVINO for an IR variant), exactly what
  the served UNet runs. Its weights are then in memory twice (the served UNet keeps its own).
* ``bls``: one business-logic-scripting call per step to the served UNet; no second copy of the
  weights (a paper-size UNet is 3.4-4.9 GB), one hop between stubs per step.

Inputs (one poster per row, rows run one after another): the UNet's step-invariant inputs, already
batched for guidance, with a leading row axis (``encoder_hidden_states`` [rows, cfg_batch, ...]);
the initial ``latents``; ``steps``, ``guidance``, the ``scheduler`` (an index into the names the
config's ``posterrt_schedulers`` parameter lists) and the PCG64 state of the row's generator,
continued in the server as in ``plannet_sampler``, so the latents are those of the client loop.
The scheduler settings are the bundle's (``sampler.json``); the config records their hash and the
client uses the loop only when its own bundle's settings hash the same.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from posterrt.runtime.contracts import ModelContract, TensorSpec, get_contract
from posterrt.runtime.errors import BackendError
from posterrt.runtime.families import unet_families
from posterrt.runtime.schedulers import SCHEDULERS, get_scheduler
from posterrt.runtime.triton.sampling_loop import (RNG_WORDS, RequestError, answer_each, generator_from_state,
                                                   generator_state, infer_first, is_triton_backend, serves_model,
                                                   set_generator_state)

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: the client half, or unit tests
    pb_utils = None

#: UNet -> the bundle config key whose ``scheduler`` settings its pipeline samples with
UNET_FAMILIES = {unet: family.config_key for unet, family in unet_families().items()}
PER_STEP_INPUTS = ("sample", "timestep")
SETTINGS_FILE = "sampler.json"
UNET_CALL_PARAMETER = "unet_call"
UNET_CALLS = ("in-process", "bls")
SCHEDULERS_PARAMETER = "posterrt_schedulers"
SETTINGS_SHA256_PARAMETER = "posterrt_sampler_settings_sha256"
#: Above this the loop calls the served UNet through BLS by default rather than holding a second
#: copy of its weights: the tiny UNets are a few MB, the paper ones 3.4 GB (bg_unet) and 4.9 GB
#: (render_unet), which twice over would not fit beside the other models in 24 GB.
IN_PROCESS_LIMIT_BYTES = 1 << 30


def loop_name(unet: str) -> str:
    return f"{unet}_sampler"


def loop_contract(unet: ModelContract) -> ModelContract:
    """The loop model's contract, from the UNet's resolved contract."""
    fixed = tuple(TensorSpec(spec.name, spec.dtype, ("batch", *spec.shape), spec.doc, spec.low, spec.high)
                  for spec in unet.inputs if spec.name not in PER_STEP_INPUTS)
    sample = unet.input("sample")
    latent_shape = ("batch", *sample.shape[1:])
    return ModelContract(
        loop_name(unet.name), unet.stage, unet.role,
        inputs=(
            *fixed,
            TensorSpec("latents", "float32", latent_shape, "initial latents (scaled by the scheduler's init_noise_sigma)"),
            TensorSpec("steps", "int64", ("batch",), "sampling steps", 1, 1001),
            TensorSpec("guidance", "float32", ("batch",), "classifier-free guidance scale (<= 1: none)", 0, 100),
            TensorSpec("scheduler", "int64", ("batch",), f"index into {SCHEDULERS_PARAMETER}", 0, len(SCHEDULERS)),
            TensorSpec("rng_state", "int64", ("batch", RNG_WORDS), "PCG64 state of the row's generator"),
        ),
        outputs=(
            TensorSpec("denoised", "float32", latent_shape, "latents after the last step"),
            TensorSpec("final_rng_state", "int64", ("batch", RNG_WORDS), "each generator's state after the loop"),
        ),
        doc=f"{unet.name}'s whole sampling loop in the server: one request per poster instead of one per step.",
    )


def sampler_settings(bundle_config: dict, unet: str, static_dims: dict) -> dict:
    """What the server needs besides the UNet: its scheduler settings and the scheduler names."""
    return {"unet": unet, "scheduler_config": bundle_config.get(UNET_FAMILIES[unet], {}).get("scheduler", {}),
            "schedulers": list(SCHEDULERS), "static_dims": static_dims}


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# -- the server half -------------------------------------------------------------------------
class _InProcessUnet:
    """What ``denoise`` needs of a backend (``bind``), over the UNet's file in this stub."""

    def __init__(self, session, output_names: list[str]):
        self.session = session
        self.output_names = output_names

    def bind(self, model: str, fixed: dict):
        import onnxruntime as ort

        from posterrt.runtime.backends.onnxruntime import iobinding_step

        if isinstance(self.session, ort.InferenceSession):
            return iobinding_step(self.session, model, self.output_names, fixed)
        return lambda inputs: dict(zip(self.output_names, self.session.run(self.output_names, {**inputs, **fixed})))


class _BlsUnet:
    """``bind`` over the served UNet, one business-logic-scripting request per step."""

    def __init__(self, output_names: list[str]):
        self.output_names = output_names

    def bind(self, model: str, fixed: dict):
        from posterrt.runtime.triton.model_config import to_wire

        contract = get_contract(model)
        fixed_tensors = [pb_utils.Tensor(name, to_wire(contract.input(name), array)) for name, array in fixed.items()]

        def step(inputs: dict) -> dict:
            tensors = [pb_utils.Tensor(name, to_wire(contract.input(name), array)) for name, array in inputs.items()]
            response = pb_utils.InferenceRequest(model_name=model, requested_output_names=self.output_names,
                                                 inputs=[*tensors, *fixed_tensors]).exec()
            if response.has_error():
                raise BackendError(f"{loop_name(model)}: {model} failed: {response.error().message()}")
            return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.output_names}

        return step


def run_row(unet, unet_name: str, settings: dict, inputs: dict, row: int) -> tuple[np.ndarray, np.ndarray]:
    """One poster's loop: (denoised latents [1, ...], the generator's final state)."""
    from posterrt.runtime.pipelines.diffusion import denoise

    guidance = float(inputs["guidance"][row])
    fixed = {name: np.ascontiguousarray(array[row]) for name, array in inputs.items()
             if name not in ("latents", "steps", "guidance", "scheduler", "rng_state")}
    expected = 2 if guidance > 1 else 1
    if any(array.shape[0] != expected for array in fixed.values()):
        raise RequestError(f"model {loop_name(unet_name)!r}: guidance {guidance:g} needs the step-invariant inputs "
                           f"batched for guidance ({expected} per row), got {sorted({a.shape[0] for a in fixed.values()})}")
    scheduler = get_scheduler(settings["schedulers"][int(inputs["scheduler"][row])], settings["scheduler_config"])
    generator = generator_from_state(inputs["rng_state"][row])
    latents = denoise(unet, unet_name, scheduler, inputs["latents"][row:row + 1], int(inputs["steps"][row]),
                      guidance, fixed, generator, progress=False)
    return latents, generator_state(generator)


class TritonPythonModel:
    def initialize(self, args):
        from posterrt.runtime.triton.model import config_parameters, open_model

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.unet = self.settings["unet"]
        unet_contract = get_contract(self.unet).resolve(self.settings["static_dims"])
        self.contract = loop_contract(unet_contract)
        parameters = config_parameters(config)
        call = parameters.get(UNET_CALL_PARAMETER, "in-process")
        if call not in UNET_CALLS:
            raise ValueError(f"{self.contract.name}: parameter {UNET_CALL_PARAMETER}={call!r}, expected one of {UNET_CALLS}")
        outputs = list(unet_contract.output_names)
        self.engine = _BlsUnet(outputs) if call == "bls" else _InProcessUnet(open_model(folder, parameters), outputs)

    def execute(self, requests):  # no dynamic batching: each request's rows run one after another
        return answer_each(pb_utils, requests, self.contract, self.denoise_rows)

    def denoise_rows(self, inputs: dict) -> dict:
        rows = [run_row(self.engine, self.unet, self.settings, inputs, row) for row in range(len(inputs["steps"]))]
        return {"denoised": np.concatenate([latents for latents, _ in rows]),
                "final_rng_state": np.stack([state for _, state in rows])}

    def finalize(self):
        self.engine = None


# -- the client half -------------------------------------------------------------------------
class UnetServerLoop:
    """``<unet>_sampler`` on the servers of a ``TritonBackend`` that serve it for this bundle.

    ``denoise(...)`` takes ``pipelines.diffusion.denoise``'s arguments and returns its latents,
    leaving ``rng`` where the loop left it."""

    def __init__(self, backend, unet: str, servers: list, schedulers: list[str]):
        self.backend = backend
        self.unet = unet
        self.servers = servers
        self.schedulers = schedulers
        self.contract = loop_contract(backend.contract(unet))

    def denoise(self, scheduler, latents: np.ndarray, steps: int, guidance: float, step_invariant: dict,
                rng: np.random.Generator) -> np.ndarray:
        scheduler.set_timesteps(steps)  # a bad step count fails here, as in the client loop
        one = lambda value, dtype: np.array([value], dtype=dtype)  # noqa: E731
        inputs = {**{name: np.asarray(array)[None] for name, array in step_invariant.items()},
                  "latents": np.asarray(latents, dtype=np.float32), "steps": one(steps, np.int64),
                  "guidance": one(guidance, np.float32), "scheduler": one(self.schedulers.index(scheduler.name), np.int64),
                  "rng_state": generator_state(rng)[None]}
        outputs = infer_first(self.backend, self.servers, self.contract, inputs)
        set_generator_state(rng, outputs["final_rng_state"][0])
        return outputs["denoised"]


def find_unet_loop(backend, unet: str) -> UnetServerLoop | None:
    """The server-side loop of ``unet`` when ``backend`` offers it, else None (the pipeline loops itself).

    A ``TritonBackend`` offers it through the servers whose ``<unet>_sampler`` runs this bundle's
    UNet (same ONNX hash) with this bundle's scheduler settings. A wrapper of a backend (the
    benchmark's timer) answers through its own ``unet_loop(unet)`` method."""
    own = getattr(backend, "unet_loop", None)
    if callable(own):
        return own(unet)
    if not is_triton_backend(backend) or unet not in backend.bundle.models or UNET_FAMILIES[unet] not in backend.bundle.config:
        return None
    from .model_config import ONNX_SHA256_PARAMETER

    entry = backend.bundle.models[unet]
    settings = sampler_settings(backend.bundle.config, unet, entry.static_dims)
    expected = {ONNX_SHA256_PARAMETER: entry.sha256, SETTINGS_SHA256_PARAMETER: settings_sha256(settings)}
    servers = [server for server in backend.servers if serves_model(server, loop_name(unet), expected)]
    return UnetServerLoop(backend, unet, servers, settings["schedulers"]) if servers else None
