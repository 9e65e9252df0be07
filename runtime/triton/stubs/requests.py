"""What every server-stage stub shares: its folder (settings, small bundle, config parameters),
reading and validating a request, and answering each request on its own.

``pb_utils`` is passed in by the calling stub (Triton's module there; tests hand the stubs a
stand-in), so this module never imports Triton's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import ModelContract, validate_inputs
from posterrt.runtime.server_stages import BUNDLE_FOLDER, SERVER_STAGES, SETTINGS_FILE, ServerStage
from posterrt.runtime.triton.model import RequestError, config_parameters, error_response

__all__ = ["RequestError", "error_response", "request_inputs", "answer_each", "StageFolder", "open_stage"]

MODEL_CALLS = ("in-process", "bls")


@dataclass
class StageFolder:
    """A stage's version folder as ``posterrt repo build`` wrote it (runtime/triton/repository.py)."""
    stage: ServerStage
    settings: dict  # what ``stage.settings`` returned for the exported bundle
    variants: dict  # {model: variant} the stage runs instead of the exports
    parameters: dict  # the config's parameters
    bundle: Bundle  # the small bundle: manifest, assets, the files it runs in-process

    @property
    def contract(self) -> ModelContract:
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
    return StageFolder(SERVER_STAGES[document["stage"]], document["settings"], document.get("variants", {}),
                       config_parameters(json.loads(args["model_config"])), Bundle(folder / BUNDLE_FOLDER))


def request_inputs(pb_utils, request, contract: ModelContract) -> dict[str, np.ndarray]:
    """A request's tensors by the contract's input names."""
    inputs = {}
    for name in contract.input_names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"model {contract.name!r}: missing input {name!r}")
        inputs[name] = tensor.as_numpy()
    return inputs


def answer_each(pb_utils, requests, contract: ModelContract, run) -> list:
    """One response per request, in order, for a stage that serves requests one at a time:
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
