"""Helpers for the Triton tests: free ports, a small real bundle, servers with their log captured."""
from __future__ import annotations

import socket
from pathlib import Path

from posterrt.runtime.triton.server import TritonServer



def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def export_served_bundle(out: Path, families: tuple[str, ...]) -> Path:
    """The tiny preset of ``families`` through the real export code (parity-checked); for tests
    that need a few real models rather than the shared twelve-model ``tiny_bundle``."""
    from posterrt.export.bundle_writer import export_bundle
    from posterrt.export.registry import FAMILIES

    models = [m for family in families for m in FAMILIES[family]]
    export_bundle("tiny", models, out, progress=False)
    return out


class LogBuffer:
    """Collects a server's log instead of printing it; shown by a failing test's assertion."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)


def start_server(repo: Path, **options) -> TritonServer:
    """A started TritonServer on 127.0.0.1 and free ports; the caller stops it."""
    http, grpc, metrics = free_ports(3)
    options.setdefault("log", LogBuffer())
    return TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, **options).start()


# --- Python-backend models in-process, with a stand-in for Triton's pb_utils --------------------
class FakeTensor:
    def __init__(self, name, array):
        import numpy as np

        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


def fake_request(inputs: dict) -> dict:
    """A request as the stand-in ``get_input_tensor_by_name`` reads it: {name: FakeTensor}."""
    return {name: FakeTensor(name, array) for name, array in inputs.items()}


def load_python_model(folder: Path):
    """``folder/1/model.py`` (a repository's Python-backend model) loaded and initialized as Triton's
    stub does it, with the config's parameters and a stand-in ``pb_utils``."""
    import importlib.util
    import json
    import types

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    spec = importlib.util.spec_from_file_location(f"posterrt_{folder.name}_under_test", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.pb_utils = types.SimpleNamespace(Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=Exception,
                                            get_input_tensor_by_name=lambda request, name: request.get(name))
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    parameters = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": parameters}),
                      "model_repository": str(folder), "model_version": "1"})
    return model
