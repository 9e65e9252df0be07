"""The stub of ``plannet_sampler`` (runtime/server_stages/plannet.py): PlanNet's sampling loop in
the server.

How: the stub runs posterrt's own ``PlanNetSampler`` (the code of the client loop, not a copy)
and calls the denoiser's ONNX file with ONNX Runtime in its own process. The alternative, a BLS
call to the served ``plannet_denoiser`` per step (``denoiser_call: bls``), still crosses two
processes per step; both are kept so the benchmark can compare them (benchmarks/RESULTS.md).
Rows that arrive together (one request with several rows, or requests Triton batched) run as one
loop with batched denoiser calls, each row drawing its noise from its own generator.
"""
from __future__ import annotations

import numpy as np

from posterrt.runtime.contracts import ModelContract, validate_inputs
from posterrt.runtime.errors import BackendError
from posterrt.runtime.families import FAMILIES
from posterrt.runtime.progress import current
from posterrt.runtime.schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig
from posterrt.runtime.server_stages.plannet import DENOISER, NAME
from posterrt.runtime.server_stages.rng import generator_from_state, generator_state
from posterrt.runtime.triton.stubs.requests import (RequestError, answer_each, error_response, open_stage,
                                                    request_control, request_inputs)

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: unit tests with a stand-in
    pb_utils = None


def check_request(contract: ModelContract, sampler: PlanNetSampler, inputs: dict) -> list[np.random.Generator]:
    """Contract checks plus what the contract cannot say; returns each row's generator."""
    validate_inputs(contract, inputs)
    steps = inputs["steps"]
    levels = sampler.config.num_timesteps
    if (steps != steps[0]).any() or not 1 <= steps[0] <= levels:
        raise RequestError(f"model {NAME!r} input 'steps': got {steps.tolist()}, expected one value in 1..{levels} "
                           f"for every row of a request")
    if len(inputs["rng_state"]) != len(steps):
        raise RequestError(f"model {NAME!r} input 'rng_state': {len(inputs['rng_state'])} rows for {len(steps)} plans")
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
                raise BackendError(f"{NAME}: {DENOISER} failed: {response.error().message()}")
            return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

        return denoise


def run_loop(sampler: PlanNetSampler, denoiser, rows: list[dict], generators: list[list]) -> list[np.ndarray]:
    """Sample every request of ``rows`` (inputs of requests with equal steps and shapes) in ONE
    loop; returns each request's tokens. ``generators[i]`` are request i's row generators."""
    stacked = {name: np.concatenate([inputs[name] for inputs in rows]) for name in ("memory", "memory_mask", "fixed_tokens")}
    flat = [g for request in generators for g in request]
    denoise = denoiser.loop_call(stacked["memory"], stacked["memory_mask"], stacked["fixed_tokens"].shape)
    control, stage = current(), FAMILIES["plannet"].stage
    tokens = sampler.sample(denoise, len(flat), flat, steps=int(rows[0]["steps"][0]),
                            fixed_tokens=stacked["fixed_tokens"], on_step=lambda step, steps: control.step(stage, step, steps))
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

        from posterrt.runtime.triton.model import session_options

        folder = open_stage(args)
        self.contract = folder.contract
        self.decoupled = folder.decoupled
        self.sampler = PlanNetSampler(PlanNetSamplerConfig.from_bundle_config(folder.settings["config"]))
        if folder.model_call == "bls":
            self.denoiser = BlsDenoiser()
        else:
            path = folder.bundle.model_path(DENOISER, variant=folder.bundle.variant_for(DENOISER, folder.variants))
            session = ort.InferenceSession(str(path), session_options(folder.parameters), providers=["CPUExecutionProvider"])
            self.denoiser = InProcessDenoiser(session, self.sampler.config.num_bins)

    def execute(self, requests):
        if self.decoupled:  # streamed: each request its own loop, under its own progress, cancellation, deadline
            return answer_each(pb_utils, requests, self.contract, self.plan, decoupled=True,
                               stage=FAMILIES["plannet"].stage)
        responses = [None] * len(requests)
        valid = []
        for index, request in enumerate(requests):
            try:
                inputs = request_inputs(pb_utils, request, self.contract)
                valid.append((index, inputs, check_request(self.contract, self.sampler, inputs)))
            except Exception as error:  # this request is bad; the others are served
                responses[index] = error_response(pb_utils, error)
        controls = {index: request_control(pb_utils, requests[index]) for index, _, _ in valid}
        for group in loop_groups(valid):
            try:
                results = run_loop(self.sampler, self.denoiser, [inputs for _, inputs, _ in group],
                                   [generators for _, _, generators in group])
            except Exception as error:
                for index, _, _ in group:
                    responses[index] = error_response(pb_utils, error)
                continue
            for (index, inputs, generators), tokens in zip(group, results):
                steps = int(inputs["steps"][0])
                try:  # a batched loop serves several requests: each one's deadline is checked after it
                    controls[index].check(FAMILIES["plannet"].stage, steps, steps)
                except Exception as error:
                    responses[index] = error_response(pb_utils, error)
                    continue
                states = np.stack([generator_state(g) for g in generators])
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("tokens", tokens), pb_utils.Tensor("final_rng_state", states)])
        return responses

    def plan(self, inputs: dict) -> dict:
        """One request's plans in one loop (the streamed model)."""
        generators = check_request(self.contract, self.sampler, inputs)
        (tokens,) = run_loop(self.sampler, self.denoiser, [inputs], [generators])
        return {"tokens": tokens, "final_rng_state": np.stack([generator_state(g) for g in generators])}

    def finalize(self):
        self.denoiser = None
