"""PlanNet's sampling loop run inside Triton: the Python-backend model ``plannet_sampler``.

Why: PlanNet samples in 100 small steps (the tiny denoiser takes under a millisecond), so a
client-side loop pays one gRPC round trip and two Python-backend hops per step, more than the step
itself. ``plannet_sampler`` takes the encoder's memory and runs the whole loop in the server: one
request per plan.

How: the stub runs posterrt's own ``PlanNetSampler`` (the code of the client loop, not a copy)
and calls the denoiser's ONNX file with ONNX Runtime in its own process. The alternative, a BLS
call to the served ``plannet_denoiser`` per step (``denoiser_call: bls``), still crosses two
processes per step; both are kept so the benchmark can compare them (benchmarks/RESULTS.md).

Same tokens as the client loop: the client sends its generator's PCG64 state (``rng_state``), the
server continues exactly that stream and sends the final state back, so a plan is the same
whichever side ran the loop. Each row of a request is one plan with its own generator; rows that
arrive together (one request with several rows, or requests Triton batched) run as one loop with
batched denoiser calls, each row drawing its noise from its own generator (the sampler takes one
generator per row).

The same file holds the client half (``find_server_loop``, ``ServerLoop``), so that both sides
share the contract and the state encoding. ``posterrt repo build`` copies it into
``plannet_sampler/1/model.py``; unlike the generic model.py it needs posterrt in the stub's Python.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from posterrt.runtime.contracts import PLANNET_DENOISER, STEP, ModelContract, TensorSpec, validate_inputs
from posterrt.runtime.errors import BackendError, ContractError, InputError
from posterrt.runtime.schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: the client half, or unit tests with a stand-in
    pb_utils = None

MODEL_NAME = "plannet_sampler"
DENOISER = PLANNET_DENOISER.name
#: files beside model.py in the repository: the denoiser's ONNX and the sampler's settings
DENOISER_FILE = "denoiser.onnx"
SETTINGS_FILE = "sampler.json"
#: config parameter: "in-process" (ONNX Runtime in the stub) or "bls" (the served plannet_denoiser)
DENOISER_CALL_PARAMETER = "denoiser_call"
DENOISER_CALLS = ("in-process", "bls")
RNG_WORDS = 6  # PCG64 state: state (2 x 64 bit), inc (2 x 64 bit), has_uint32, uinteger

_TOKENS = PLANNET_DENOISER.input("tokens")
PLANNET_SAMPLER = ModelContract(
    MODEL_NAME, "layout", STEP,
    inputs=(
        PLANNET_DENOISER.input("memory"),
        PLANNET_DENOISER.input("memory_mask"),
        replace(_TOKENS, name="fixed_tokens", doc="given tokens (the product's class); mask_token where the sampler decides"),
        TensorSpec("steps", "int64", ("batch",), "levels visited, 1..num_timesteps; equal across one request", 1),
        TensorSpec("rng_state", "int64", ("batch", RNG_WORDS), "PCG64 state of each row's generator (generator_state)"),
    ),
    outputs=(
        replace(_TOKENS, name="tokens", doc="sampled tokens, no mask token left"),
        TensorSpec("final_rng_state", "int64", ("batch", RNG_WORDS), "each generator's state after the loop"),
    ),
    doc="The whole PlanNet sampling loop in the server: one request per plan instead of one per step.",
)


# -- generator state on the wire ---------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def generator_state(generator: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's full state as int64 [6] (uint64 words reinterpreted)."""
    state = generator.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        raise InputError(f"generator: the server-side loop continues PCG64 streams, got {state.get('bit_generator')!r}")
    value, inc = state["state"]["state"], state["state"]["inc"]
    words = [value >> 64, value & _MASK64, inc >> 64, inc & _MASK64, state["has_uint32"], state["uinteger"]]
    return np.array(words, dtype=np.uint64).view(np.int64)


def set_generator_state(generator: np.random.Generator, words: np.ndarray) -> np.random.Generator:
    """Put the state ``generator_state`` wrote into ``generator`` (a PCG64 one); returns it."""
    high, low, inc_high, inc_low, has_uint32, uinteger = (int(w) for w in np.asarray(words, np.int64).view(np.uint64))
    if has_uint32 not in (0, 1) or uinteger >= 1 << 32 or not inc_low & 1:
        raise ContractError(f"rng_state: {list(np.asarray(words))} is not a PCG64 state (odd increment, "
                            f"has_uint32 0/1, uinteger < 2**32 expected)")
    generator.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": has_uint32, "uinteger": uinteger,
                                     "state": {"state": high << 64 | low, "inc": inc_high << 64 | inc_low}}
    return generator


def generator_from_state(words: np.ndarray) -> np.random.Generator:
    return set_generator_state(np.random.Generator(np.random.PCG64()), words)


# -- the server half -------------------------------------------------------------------------
class RequestError(Exception):
    """A request the sampler cannot serve; answered on that request only."""


def request_inputs(pb_utils, request, contract: ModelContract) -> dict[str, np.ndarray]:
    """A request's tensors by the contract's input names (the server-side loops' common first step);
    ``pb_utils`` is the calling stub's module (tests hand the stubs a stand-in)."""
    inputs = {}
    for name in contract.input_names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"model {contract.name!r}: missing input {name!r}")
        inputs[name] = tensor.as_numpy()
    return inputs


def answer_each(pb_utils, requests, contract: ModelContract, run) -> list:
    """One response per request, in order, for a model that serves requests one at a time:
    ``run(inputs) -> {output name: array}`` on each request's validated inputs. A request that
    lacks an input, fails validation or whose run raises gets its error alone; the others are
    served."""
    responses = []
    for request in requests:
        try:
            inputs = request_inputs(pb_utils, request, contract)
            validate_inputs(contract, inputs)
            outputs = run(inputs)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]))
        except Exception as error:
            responses.append(error_response(pb_utils, error))
    return responses


def error_response(pb_utils, error: Exception):
    """The response that fails one request with ``error``'s message."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error) or type(error).__name__))


def check_request(contract: ModelContract, sampler: PlanNetSampler, inputs: dict) -> list[np.random.Generator]:
    """Contract checks plus what the contract cannot say; returns each row's generator."""
    validate_inputs(contract, inputs)
    steps = inputs["steps"]
    levels = sampler.config.num_timesteps
    if (steps != steps[0]).any() or not 1 <= steps[0] <= levels:
        raise RequestError(f"model {MODEL_NAME!r} input 'steps': got {steps.tolist()}, expected one value in 1..{levels} "
                           f"for every row of a request")
    if len(inputs["rng_state"]) != len(steps):
        raise RequestError(f"model {MODEL_NAME!r} input 'rng_state': {len(inputs['rng_state'])} rows for {len(steps)} plans")
    return [generator_from_state(words) for words in inputs["rng_state"]]


class InProcessDenoiser:
    """The denoiser's ONNX in this process. The memory is step-invariant: it is bound once per
    loop (IO binding) and only tokens and timestep are bound per step; the logits land in one
    buffer reused by every step (the sampler reads the rows it needs before the next call)."""

    def __init__(self, session, num_bins: int):
        self.session = session
        self.num_bins = num_bins

    def loop_call(self, memory: np.ndarray, memory_mask: np.ndarray, tokens_shape: tuple):
        binding = self.session.io_binding()
        binding.bind_cpu_input("memory", memory)
        binding.bind_cpu_input("memory_mask", memory_mask)
        logits = np.empty((*tokens_shape, self.num_bins), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)

        def denoise(tokens: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            binding.bind_cpu_input("tokens", tokens)
            binding.bind_cpu_input("timestep", timestep)
            self.session.run_with_iobinding(binding)
            return logits

        return denoise


class BlsDenoiser:
    """The served ``plannet_denoiser`` through Triton's business-logic scripting, once per step."""

    def loop_call(self, memory: np.ndarray, memory_mask: np.ndarray, tokens_shape: tuple):
        fixed = [pb_utils.Tensor("memory", memory), pb_utils.Tensor("memory_mask", memory_mask)]

        def denoise(tokens: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            request = pb_utils.InferenceRequest(
                model_name=DENOISER, requested_output_names=["logits"],
                inputs=[pb_utils.Tensor("tokens", tokens), pb_utils.Tensor("timestep", timestep.reshape(-1, 1)), *fixed])
            response = request.exec()
            if response.has_error():
                raise BackendError(f"{MODEL_NAME}: {DENOISER} failed: {response.error().message()}")
            return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

        return denoise


def run_loop(sampler: PlanNetSampler, denoiser, rows: list[dict], generators: list[list]) -> list[np.ndarray]:
    """Sample every request of ``rows`` (inputs of requests with equal steps and shapes) in ONE
    loop; returns each request's tokens. ``generators[i]`` are request i's row generators."""
    stacked = {name: np.concatenate([inputs[name] for inputs in rows]) for name in ("memory", "memory_mask", "fixed_tokens")}
    flat = [g for request in generators for g in request]
    denoise = denoiser.loop_call(stacked["memory"], stacked["memory_mask"], stacked["fixed_tokens"].shape)
    tokens = sampler.sample(denoise, len(flat), flat, steps=int(rows[0]["steps"][0]),
                            fixed_tokens=stacked["fixed_tokens"])
    cuts = np.cumsum([len(request) for request in generators])[:-1]
    return np.split(tokens, cuts)


def loop_groups(items: list[tuple[int, dict, list]]) -> list[list[tuple[int, dict, list]]]:
    """Requests that can share one loop: same steps, same memory length."""
    groups: dict[tuple, list] = {}
    for item in items:
        inputs = item[1]
        groups.setdefault((int(inputs["steps"][0]), inputs["memory"].shape[1:]), []).append(item)
    return list(groups.values())


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        from posterrt.runtime.triton.model import config_parameters, session_options

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.contract = PLANNET_SAMPLER.resolve(settings["static_dims"])
        self.sampler = PlanNetSampler(PlanNetSamplerConfig.from_bundle_config(settings["plannet"]))
        parameters = config_parameters(config)
        call = parameters.get(DENOISER_CALL_PARAMETER, "in-process")
        if call not in DENOISER_CALLS:
            raise ValueError(f"{MODEL_NAME}: parameter {DENOISER_CALL_PARAMETER}={call!r}, expected one of {DENOISER_CALLS}")
        if call == "bls":
            self.denoiser = BlsDenoiser()
        else:
            session = ort.InferenceSession(str(folder / DENOISER_FILE), session_options(parameters),
                                           providers=["CPUExecutionProvider"])
            self.denoiser = InProcessDenoiser(session, self.sampler.config.num_bins)

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for index, request in enumerate(requests):
            try:
                inputs = request_inputs(pb_utils, request, self.contract)
                valid.append((index, inputs, check_request(self.contract, self.sampler, inputs)))
            except Exception as error:  # this request is bad; the others are served
                responses[index] = error_response(pb_utils, error)
        for group in loop_groups(valid):
            try:
                results = run_loop(self.sampler, self.denoiser, [inputs for _, inputs, _ in group],
                                   [generators for _, _, generators in group])
            except Exception as error:
                for index, _, _ in group:
                    responses[index] = error_response(pb_utils, error)
                continue
            for (index, _, generators), tokens in zip(group, results):
                states = np.stack([generator_state(g) for g in generators])
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("tokens", tokens), pb_utils.Tensor("final_rng_state", states)])
        return responses

    def finalize(self):
        self.denoiser = None


# -- the client half -------------------------------------------------------------------------
class ServerLoop:
    """``plannet_sampler`` on the servers of a ``TritonBackend`` that serve it.

    ``sample(memory, memory_mask, fixed_tokens, steps, generators)`` returns what
    ``PlanNetSampler.sample`` returns for each row with its own generator, and leaves each
    generator where the loop left it. Servers are tried in order; the first that answers wins.
    """

    def __init__(self, backend, servers: list):
        self.backend = backend
        self.servers = servers
        self.contract = PLANNET_SAMPLER.resolve(backend.bundle.models[DENOISER].static_dims)

    def sample(self, memory: np.ndarray, memory_mask: np.ndarray, fixed_tokens: np.ndarray, steps: int,
               generators: list[np.random.Generator]) -> np.ndarray:
        batch = len(generators)
        inputs = {"memory": memory, "memory_mask": memory_mask, "fixed_tokens": np.asarray(fixed_tokens, dtype=np.int64),
                  "steps": np.full(batch, steps, dtype=np.int64),
                  "rng_state": np.stack([generator_state(g) for g in generators])}
        outputs = infer_first(self.backend, self.servers, self.contract, inputs)
        for generator, words in zip(generators, outputs["final_rng_state"]):
            set_generator_state(generator, words)
        return outputs["tokens"]


def infer_first(backend, servers: list, contract: ModelContract, inputs: dict) -> dict:
    """One request to the served model ``contract.name`` (a server-side loop), validated here first;
    servers are tried in order and the first that answers wins."""
    validate_inputs(contract, inputs)
    failures = []
    for server in servers:
        try:
            return _infer(backend, server, contract, inputs)
        except Exception as error:  # unreachable, overloaded or refusing: the next server may answer
            failures.append(f"{server.url}: {_describe(error)}")
    raise BackendError(f"model {contract.name!r}: no Triton server answered; {'; '.join(failures)}")


def _infer(backend, server, contract: ModelContract, inputs: dict) -> dict:
    from .model_config import WIRE_DTYPES, from_wire, to_wire

    module = server.connections.module
    binary = {"binary_data": True} if server.scheme == "http" else {}
    items = []
    for spec in contract.inputs:
        array = to_wire(spec, np.ascontiguousarray(inputs[spec.name]))
        item = module.InferInput(spec.name, list(array.shape), WIRE_DTYPES[spec.dtype])
        item.set_data_from_numpy(array, **binary)
        items.append(item)
    requested = [module.InferRequestedOutput(spec.name, **binary) for spec in contract.outputs]
    with server.connections.client() as client:
        timeout = {"client_timeout": backend.timeout_s} if server.scheme == "grpc" else {}
        result = client.infer(contract.name, items, outputs=requested, **timeout)
    return {spec.name: from_wire(spec, result.as_numpy(spec.name)) for spec in contract.outputs}


def find_server_loop(backend) -> ServerLoop | None:
    """The server-side PlanNet loop when ``backend`` offers it, else None (the pipeline loops itself).

    A ``TritonBackend`` offers it through the servers that serve ``plannet_sampler`` for this
    bundle's denoiser (the sampler's config records the hash of the ONNX it runs). A wrapper of a
    backend (the benchmark's timer) answers through its own ``server_loop()`` method.
    """
    own = getattr(backend, "server_loop", None)
    if callable(own):
        return own()
    if not is_triton_backend(backend) or DENOISER not in backend.bundle.models:
        return None
    from .model_config import ONNX_SHA256_PARAMETER

    expected = {ONNX_SHA256_PARAMETER: backend.bundle.models[DENOISER].sha256}
    servers = [server for server in backend.servers if serves_model(server, MODEL_NAME, expected)]
    return ServerLoop(backend, servers) if servers else None


def is_triton_backend(backend) -> bool:
    # A TritonBackend exists only once its module was imported: embedded users never import it here.
    triton = sys.modules.get("posterrt.runtime.backends.triton")
    return triton is not None and isinstance(backend, triton.TritonBackend)


def serves_model(server, model: str, parameters: dict[str, str]) -> bool:
    """Whether ``server`` has ``model`` ready with config ``parameters`` of these values."""
    try:
        with server.connections.client() as client:
            if not client.is_model_ready(model):
                return False
            config = client.get_model_config(model, **({"as_json": True} if server.scheme == "grpc" else {}))
    except Exception:  # an old server, or one that is down: the client loop works everywhere
        return False
    served = config.get("config", config).get("parameters", {})
    return all(served.get(key, {}).get("string_value") == value for key, value in parameters.items())


def _describe(error: Exception) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    text = (message or type(error).__name__).strip()
    return text.splitlines()[0] if text else type(error).__name__
