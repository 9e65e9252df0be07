"""Generic Triton Python-backend model: one ONNX file run by ONNX Runtime, or one OpenVINO IR run
by OpenVINO (the repository's cpu flavor).

``posterrt repo build`` copies this same file into every ``<model>/1/`` beside ``model.onnx`` (or,
for an OpenVINO variant, ``model.xml`` + ``model.bin``) and ``contract.json`` (the model's
resolved I/O contract); nothing in it is specific to one model.

* ``initialize`` opens the ONNX Runtime session once, with the thread settings from the config's
  parameters (``intra_op_thread_count`` / ``inter_op_thread_count`` / ``allow_spinning``, the ONNX
  Runtime backend's keys). When the folder holds ``model.xml`` it compiles that IR with OpenVINO
  instead, at the precision the IR records, with ``intra_op_thread_count`` threads
  (``OpenVinoModel``); everything below is the same for both engines.
* ``execute`` validates every request on its own: a bad one (too many bytes, shape, dtype, NaN, out
  of range) gets a ``TritonError`` on its own response, the others are served. The size is checked
  first, from the tensors' byte counts alone (``max_request_bytes`` in ``contract.json``): Triton
  2.51's front ends take any body size, so this is where an oversized request stops. Requests
  Triton batched together and with the same non-batch shapes run as ONE engine call: inputs
  concatenated along the batch axis, outputs split back.

Validation uses ``posterrt.runtime.contracts.validate_inputs`` when posterrt (same contract
version) is importable in the stub's Python; otherwise ``check_inputs`` below does the same checks
from ``contract.json`` with numpy alone, so the repository also runs in a stock Triton container.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests inject a stand-in)
    pb_utils = None

CONTRACT_FILE = "contract.json"
ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"  # an OpenVINO IR variant; OpenVINO reads model.bin beside it
#: where posterrt's IR variants record the precision to run at (runtime/backends/openvino.py)
IR_PRECISION_KEY = ["posterrt", "inference_precision"]
IR_PRECISIONS = ("f32", "bf16")


class RequestError(Exception):
    """A request this model (or a server stage) cannot serve; answered on that request only."""


def error_response(pb_utils, error: Exception):
    """The response that fails one request with ``error``'s message (``pb_utils``: the calling
    stub's module; tests hand the stubs a stand-in)."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error) or type(error).__name__))


def check_inputs(document: dict, inputs: dict) -> None:
    """The checks of ``posterrt.runtime.contracts.validate_inputs``, from ``contract.json`` alone."""
    model = document["model"]
    names = [spec["name"] for spec in document["inputs"]]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise RequestError(f"model {model!r}: missing inputs {missing}")
    seen: dict[str, int] = {}
    for spec in document["inputs"]:
        array, where = inputs[spec["name"]], f"model {model!r} input {spec['name']!r}"
        if array.dtype != np.dtype(spec["dtype"]):
            raise RequestError(f"{where}: expected dtype {spec['dtype']}, got {array.dtype}")
        if array.ndim != len(spec["shape"]):
            raise RequestError(f"{where}: expected rank {len(spec['shape'])} {spec['shape']}, got shape {array.shape}")
        for axis, (symbol, size) in enumerate(zip(spec["shape"], array.shape)):
            if isinstance(symbol, int):
                if size != symbol:
                    raise RequestError(f"{where}: axis {axis} must be {symbol}, got {size} (shape {array.shape})")
                continue
            low, high, multiple = document["ranges"][symbol]
            if symbol in seen and seen[symbol] != size:
                raise RequestError(f"{where}: axis {axis} ({symbol}) is {size}, but another input has {symbol}={seen[symbol]}")
            if not low <= size <= high or size % multiple:
                raise RequestError(f"{where}: axis {axis} ({symbol}) must be in {low}..{high}"
                                   + (f", a multiple of {multiple}" if multiple > 1 else "") + f", got {size}")
            seen[symbol] = size
        if not array.size:
            continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(f"{where}: contains NaN or Inf")
        if spec.get("low") is not None and array.min() < spec["low"]:
            raise RequestError(f"{where}: values must be >= {spec['low']}, got min {array.min()}")
        high = spec.get("high")
        if high is not None:
            integer = array.dtype.kind in "iu"
            if (array.max() >= high) if integer else (array.max() > high):
                raise RequestError(f"{where}: values must be {'<' if integer else '<='} {high}, got max {array.max()}")


def check_request_bytes(document: dict, inputs: dict) -> None:
    """Refuse a request whose tensors hold more bytes than ``max_request_bytes``, before any value is read."""
    limit = document.get("max_request_bytes")
    total = sum(int(array.nbytes) for array in inputs.values())
    if limit is not None and total > limit:
        raise RequestError(f"model {document['model']!r}: request of {total} bytes is over the limit of {limit} "
                           f"bytes (max_request_bytes in {CONTRACT_FILE}); send smaller or fewer tensors")


def contract_validator(document: dict):
    """``f(inputs)`` raising on a bad request: posterrt's own validation when it speaks this contract."""
    try:
        from posterrt.runtime.contracts import CONTRACT_VERSION, get_contract, validate_inputs
    except ImportError:
        CONTRACT_VERSION = None
    if CONTRACT_VERSION != document["contract_version"]:
        return lambda inputs: check_inputs(document, inputs)
    contract = get_contract(document["model"]).resolve(document["static_dims"])
    return lambda inputs: validate_inputs(contract, inputs)


def batch_groups(items: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
    """Requests whose inputs agree on every non-batch axis, in arrival order: one engine call each."""
    groups: dict[tuple, list] = {}
    for index, inputs in items:
        key = tuple((name, array.shape[1:]) for name, array in sorted(inputs.items()))
        groups.setdefault(key, []).append((index, inputs))
    return list(groups.values())


def run_batched(session, output_names: list[str], group: list[tuple[int, dict]]) -> list[dict]:
    """One engine call (ONNX Runtime or OpenVINO) for the whole group; each request gets its slice of every output."""
    if len(group) == 1:
        return [dict(zip(output_names, session.run(output_names, group[0][1])))]
    names = list(group[0][1])
    sizes = [inputs[names[0]].shape[0] for _, inputs in group]
    batched = {name: np.concatenate([inputs[name] for _, inputs in group], axis=0) for name in names}
    outputs = session.run(output_names, batched)
    cuts = np.cumsum(sizes)[:-1]
    pieces = [np.split(array, cuts, axis=0) for array in outputs]
    return [{name: np.ascontiguousarray(piece[i]) for name, piece in zip(output_names, pieces)}
            for i in range(len(group))]


def config_parameters(config: dict) -> dict[str, str]:
    """The ``parameters`` of a model config (as Triton hands it to ``initialize``) as plain strings."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def session_options(parameters: dict[str, str]):
    """ONNX Runtime options from the config's parameters (the ONNX Runtime backend's keys).

    ``allow_spinning`` defaults to 0: a spinning idle pool thread burns a core that the other
    models' stubs (and, on a shared machine, everything else) need; benchmarks/RESULTS.md
    (Serving) has the measurement.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", 1))
    options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", 1))
    options.add_session_config_entry("session.intra_op.allow_spinning", parameters.get("allow_spinning", "0"))
    return options


def import_openvino():
    """``import openvino`` with its usage telemetry off: the lines of
    ``posterrt.runtime.backends.openvino.import_openvino`` (read the reason there), repeated because
    this file must run without posterrt. openvino's converter reports to Intel's telemetry service
    unless ``openvino_telemetry`` cannot be imported; nothing may reach off the machine."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: that import fails
    try:
        import openvino
    except ImportError:
        raise ImportError(f"{IR_FILE} is an OpenVINO IR and the `openvino` package is not installed in the Python of "
                          f"Triton's Python-backend stub; install it there (pip install openvino)") from None
    return openvino


def ir_precision(model) -> str:
    """The precision the IR says to run at; f32 when it says nothing (OpenVINO's own default on a
    bf16-capable CPU would be bf16)."""
    if not model.has_rt_info(IR_PRECISION_KEY):
        return "f32"
    precision = model.get_rt_info(IR_PRECISION_KEY).astype(str)
    if precision not in IR_PRECISIONS:
        raise ValueError(f"{IR_FILE}: rt_info {'/'.join(IR_PRECISION_KEY)} is {precision!r}, expected one of {IR_PRECISIONS}")
    return precision


class OpenVinoModel:
    """An IR compiled for the CPU, with ONNX Runtime's ``run(output_names, feeds)`` so that
    ``run_batched`` drives either engine.

    The same settings as posterrt's ``OpenVinoSession`` (LATENCY hint, the IR's precision), plus:
    ``threads`` from ``intra_op_thread_count``, and no CPU pinning: every model instance is its own
    stub process, and OpenVINO's pinning (on by default on Linux) binds each process's workers to
    cores chosen without regard to the others (measured, OpenVINO 2026.4 on 2 cores: two processes
    with 2 threads each both pinned their worker to core 1). One infer request per calling thread
    (Triton calls ``execute`` of an instance from one thread, so in practice one per instance)."""

    def __init__(self, path: Path, threads: int):
        ov = import_openvino()
        core = ov.Core()
        model = core.read_model(str(path))
        self.precision = ir_precision(model)
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False})
        self._local = threading.local()

    def run(self, output_names: list[str], feeds: dict) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer(dict(feeds))
        by_name = {key.get_any_name(): value for key, value in results.items()}
        # the request reuses its output buffers on the next call: hand out copies
        return [np.array(by_name[name], copy=True) for name in output_names]


def open_model(folder: Path, parameters: dict[str, str]):
    """The engine for the version folder: OpenVINO for ``model.xml``, else ONNX Runtime for ``model.onnx``."""
    if (folder / IR_FILE).is_file():
        return OpenVinoModel(folder / IR_FILE, int(parameters.get("intra_op_thread_count", 1)))
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / ONNX_FILE), session_options(parameters), providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.document = json.loads((folder / CONTRACT_FILE).read_text())
        self.input_names = [spec["name"] for spec in self.document["inputs"]]
        self.output_names = [spec["name"] for spec in self.document["outputs"]]
        self.validate = contract_validator(self.document)
        self.session = open_model(folder, config_parameters(config))

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for index, request in enumerate(requests):
            try:
                inputs = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise RequestError(f"model {self.document['model']!r}: missing input {name!r}")
                    inputs[name] = tensor.as_numpy()
                check_request_bytes(self.document, inputs)
                self.validate(inputs)
                valid.append((index, inputs))
            except Exception as error:  # the request is bad; the model and the other requests are fine
                responses[index] = error_response(pb_utils, error)
        for group in batch_groups(valid):
            try:
                results = run_batched(self.session, self.output_names, group)
            except Exception as error:
                for index, _ in group:
                    responses[index] = error_response(pb_utils, error)
                continue
            for (index, _), outputs in zip(group, results):
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, outputs[name]) for name in self.output_names])
        return responses

    def finalize(self):
        self.session = None
