"""The client half of the server stages (runtime/server_stages): a stage on the servers of a
``TritonBackend`` that serve it for this bundle, called with the pipeline's own arguments.

``TritonBackend.server_stage(name)`` builds a ``StageClient`` when at least one server has the
stage ready with this bundle's identity (the driven models' hashes and the stage's settings,
recorded by ``posterrt repo build`` in the config); otherwise the pipeline loops itself.
"""
from __future__ import annotations

import numpy as np

from ..contracts import ModelContract, validate_inputs
from ..errors import BackendError
from ..server_stages import SERVER_STAGES, ServerStage
from ..triton.model_config import STAGE_SHA256_PARAMETER, WIRE_DTYPES, from_wire, to_wire


class StageClient:
    """``stage`` on ``servers``: ``client(*args)`` takes the arguments of the pipeline code the stage
    replaces (``stage.encode``'s) and returns what that code returns. Servers are tried in order;
    the first that answers wins."""

    def __init__(self, backend, stage: ServerStage, servers: list):
        self.backend = backend
        self.stage = stage
        self.servers = servers
        self.contract = stage.contract(backend.bundle)

    @property
    def name(self) -> str:
        return self.stage.name

    def __call__(self, *args, **kwargs):
        inputs, decode = self.stage.encode(self.contract, *args, **kwargs)
        return decode(infer_first(self.backend, self.servers, self.contract, inputs))


def find_stage(backend, name: str) -> StageClient | None:
    """A client for stage ``name`` when a server of ``backend`` serves it for this bundle, else None."""
    stage = SERVER_STAGES.get(name)
    if stage is None or not stage.available(backend.bundle):
        return None
    expected = {STAGE_SHA256_PARAMETER: stage.identity(backend.bundle)}
    servers = [server for server in backend.servers if serves_model(server, name, expected)]
    return StageClient(backend, stage, servers) if servers else None


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


def infer_first(backend, servers: list, contract: ModelContract, inputs: dict) -> dict:
    """One request to the served stage ``contract.name``, validated here first; servers are tried
    in order and the first that answers wins."""
    validate_inputs(contract, inputs)
    failures = []
    for server in servers:
        try:
            return _infer(backend, server, contract, inputs)
        except Exception as error:  # unreachable, overloaded or refusing: the next server may answer
            failures.append(f"{server.url}: {_describe(error)}")
    raise BackendError(f"model {contract.name!r}: no Triton server answered; {'; '.join(failures)}")


def _infer(backend, server, contract: ModelContract, inputs: dict) -> dict:
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


def _describe(error: Exception) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    text = (message or type(error).__name__).strip()
    return text.splitlines()[0] if text else type(error).__name__
