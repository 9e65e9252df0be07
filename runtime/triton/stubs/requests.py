"""What every server-stage stub shares: its folder (settings, small bundle, config parameters),
reading and validating a request, answering each request on its own, and running it under the
request's control (runtime/progress.py): its deadline (Triton's request ``timeout``), Triton's
cancellation flag and, for the streamed (decoupled) model, progress responses on its sender.

``pb_utils`` is passed in by the calling stub (Triton's module there; tests hand the stubs a
stand-in), so this module never imports Triton's.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import ModelContract, validate_inputs
from posterrt.runtime.progress import ProgressEvent, RunControl, controlled
from posterrt.runtime.server_stages import BUNDLE_FOLDER, PROGRESS, SERVER_STAGES, SETTINGS_FILE, ServerStage
from posterrt.runtime.triton.model import RequestError, config_parameters, error_response

__all__ = ["RequestError", "error_response", "request_inputs", "answer_each", "StageFolder", "open_stage",
           "request_control"]

MODEL_CALLS = ("in-process", "bls")
#: A streamed stage sends at most one progress response per this interval (and always the last
#: step's); the client expands a response into one event per step. PlanNet's sub-millisecond steps
#: would otherwise pay a response each (benchmarks/RESULTS.md, Streaming).
PROGRESS_INTERVAL_S = 0.01


@dataclass
class StageFolder:
    """A stage's version folder as ``posterrt repo build`` wrote it (runtime/triton/repository.py)."""
    stage: ServerStage
    settings: dict  # what ``stage.settings`` returned for the exported bundle
    variants: dict  # {model: variant} the stage runs instead of the exports
    parameters: dict  # the config's parameters
    bundle: Bundle  # the small bundle: manifest, assets, the files it runs in-process
    decoupled: bool  # the streamed model: answers through each request's response sender

    @property
    def contract(self) -> ModelContract:
        """The request's contract (the streamed model's extra progress output is the stub's to send)."""
        return self.stage.contract(self.bundle)

    @property
    def model_call(self) -> str:
        """How the stub calls its driven model: ``in-process`` (its own copy) or ``bls`` (the served one)."""
        call = self.parameters.get(self.stage.model_call, "in-process") if self.stage.model_call else "in-process"
        if call not in MODEL_CALLS:
            raise ValueError(f"{self.stage.name}: parameter {self.stage.model_call}={call!r}, expected one of {MODEL_CALLS}")
        return call

    def in_process_backend(self):
        """An ONNX Runtime backend over the small bundle with the config's thread settings (and the
        served models' policy, model.session_options: an idle spinning thread burns a core)."""
        from posterrt.runtime.backends.onnxruntime import OrtBackend

        backend = OrtBackend(self.bundle, intra_op_threads=int(self.parameters.get("intra_op_thread_count", 1)),
                             inter_op_threads=int(self.parameters.get("inter_op_thread_count", 1)), variants=self.variants)
        backend.options_template.add_session_config_entry("session.intra_op.allow_spinning",
                                                          self.parameters.get("allow_spinning", "0"))
        backend.load(list(self.stage.models))  # hashes checked and sessions built now, not on the first request
        return backend


def open_stage(args: dict) -> StageFolder:
    """The folder of the model Triton is initializing (``args`` of ``initialize``)."""
    folder = Path(args["model_repository"]) / args["model_version"]
    document = json.loads((folder / SETTINGS_FILE).read_text())
    config = json.loads(args["model_config"])
    decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
    return StageFolder(SERVER_STAGES[document["stage"]], document["settings"], document.get("variants", {}),
                       config_parameters(config), Bundle(folder / BUNDLE_FOLDER), decoupled)


class ProgressSender:
    """Progress events of one request as responses on its sender, at most one per
    :data:`PROGRESS_INTERVAL_S` (the last step always)."""

    def __init__(self, pb_utils, sender):
        self.pb_utils, self.sender = pb_utils, sender
        self.last_sent = float("-inf")

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.step < event.total and now - self.last_sent < PROGRESS_INTERVAL_S:
            return
        self.last_sent = now
        progress = np.array([[event.step, event.total]], dtype=np.int64)
        self.sender.send(self.pb_utils.InferenceResponse(output_tensors=[self.pb_utils.Tensor(PROGRESS.name, progress)]))


def request_control(pb_utils, request, sender=None) -> RunControl:
    """The request's control: its deadline (the request's ``timeout``, microseconds, 0: none),
    Triton's cancellation flag and, given the streamed model's ``sender``, progress responses."""
    timeout_us = request.timeout() if hasattr(request, "timeout") else 0
    return RunControl(ProgressSender(pb_utils, sender) if sender is not None else None,
                      timeout_us / 1e6 if timeout_us else None,
                      request.is_cancelled if hasattr(request, "is_cancelled") else None)


def request_inputs(pb_utils, request, contract: ModelContract) -> dict[str, np.ndarray]:
    """A request's tensors by the contract's input names."""
    inputs = {}
    for name in contract.input_names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"model {contract.name!r}: missing input {name!r}")
        inputs[name] = tensor.as_numpy()
    return inputs


def answer_each(pb_utils, requests, contract: ModelContract, run, decoupled: bool = False, stage: str = ""):
    """Answer each request on its own, in order, for a stage that serves requests one at a time:
    ``run(inputs) -> {output name: array}`` on each request's validated inputs, under the request's
    control. A request that lacks an input, fails validation, is cancelled, passes its deadline or
    whose run raises gets its error alone; the others are served. ``decoupled`` (the streamed
    model): each answer, after the progress responses, goes to the request's sender as its final
    response, and None is returned; otherwise the list of responses. A request cancelled or past its
    deadline while it waited in the queue is answered so before its loop starts (``stage``: the
    pipeline stage its errors name)."""
    responses = []
    for request in requests:
        sender = request.get_response_sender() if decoupled else None
        try:
            inputs = request_inputs(pb_utils, request, contract)
            validate_inputs(contract, inputs)
            with controlled(request_control(pb_utils, request, sender)) as control:
                control.check(stage)
                outputs = run(inputs)
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()])
        except Exception as error:
            response = error_response(pb_utils, error)
        if sender is None:
            responses.append(response)
        else:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    return None if decoupled else responses
