"""OpenVINO as a second CPU engine of the embedded backend, for the variants ``posterrt engines
optimize`` writes as OpenVINO IR (``<model>.openvino-fp32.xml``, ``.openvino-bf16.xml``,
``.openvino-int8.xml``: NNCF's quantized IR, whose int8 operations carry their own quantization and
whose float remainder runs at the IR's precision).

Why a second engine: on this CPU family (AVX-512 with bf16) OpenVINO runs a UNet step in bf16,
which ONNX Runtime's CPU provider cannot (it has no bf16 Conv or MatMul kernels), and its fp32
kernels are faster on the paper UNet too (benchmarks/RESULTS.md). The IR is a saved, converted
graph; the precision to run it at is written into the IR itself (``rt_info`` key
``posterrt/inference_precision``), so the file the manifest hashes says how it must run: OpenVINO's
own default on a bf16-capable CPU is bf16, so an fp32 variant must say f32 explicitly.

:class:`OpenVinoSession` looks like the part of ``onnxruntime.InferenceSession`` the backends use
(``run(output_names, feeds)``), so the embedded backend and the quality gate pick an engine by the
file and change nothing else. Thread-safe: one infer request per calling thread (an OpenVINO infer
request runs one inference at a time; the compiled model is shared).
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import BackendError, InputError

IR_SUFFIX = ".xml"
PRECISION_KEY = ["posterrt", "inference_precision"]
PRECISIONS = ("f32", "bf16")


def is_openvino_ir(path: str | Path) -> bool:
    return Path(path).suffix == IR_SUFFIX


def openvino_installed() -> bool:
    """Whether ``openvino`` can be imported here (without importing it: that takes seconds)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"] is not None  # None: made unimportable on purpose
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """``import openvino``, with its usage telemetry off.

    ``import openvino`` imports its model converter, which reports the import (and every
    conversion) to Intel's telemetry service unless the user opted out in ~/intel or runs under
    CI=true. Nothing of posterrt may reach off the machine, so the telemetry package is made
    unimportable first: openvino then falls back to its built-in no-op stub (its own code does
    ``except ImportError``). Only when openvino is not loaded yet; a process that imported it
    earlier made its own choice."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: the import fails
    try:
        import openvino
    except ImportError:
        raise BackendError("this bundle variant is an OpenVINO IR and the `openvino` package is not installed; "
                           "install it with `pip install \"posterrt[openvino]\"`") from None
    return openvino


class OpenVinoSession:
    """One compiled OpenVINO model on the CPU. ``threads``: inference threads (None: OpenVINO's
    default, one per physical core)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ov = import_openvino()
        self.path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as error:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"OpenVINO cannot read {self.path.name}: {error}") from None
        self.precision = ir_precision(model)
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as error:
            raise BackendError(f"OpenVINO cannot compile {self.path.name} for the CPU: {error}") from None
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self._local = threading.local()

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer(dict(feeds))
        by_name = {key.get_any_name(): value for key, value in results.items()}
        # The request owns its output buffers and reuses them on the next call: hand out copies.
        return [np.array(by_name[name], copy=True) for name in (output_names or self.output_names)]


def ir_precision(model) -> str:
    """The inference precision an IR was written for (``f32`` when it says nothing)."""
    if not model.has_rt_info(PRECISION_KEY):
        return "f32"
    precision = model.get_rt_info(PRECISION_KEY).astype(str)
    if precision not in PRECISIONS:
        raise InputError(f"OpenVINO IR rt_info {'/'.join(PRECISION_KEY)}: got {precision!r}, expected one of {PRECISIONS}")
    return precision


def read_onnx(onnx_path: str | Path):
    """An ONNX file as an OpenVINO model, through Core.read_model (the runtime's ONNX reader), not
    ov.convert_model: the converter reports usage to Intel's telemetry service, and nothing of
    posterrt reaches off the machine."""
    return import_openvino().Core().read_model(str(onnx_path))


def save_ir(model, target: str | Path, precision: str) -> dict:
    """Write ``model`` as an IR at ``target`` (``.xml`` + ``.bin``) marked to run at ``precision``.
    Float weights are stored as they are in the model (OpenVINO's default would compress them to
    fp16, which would make even the f32 variant approximate); int8 weights stay int8."""
    if precision not in PRECISIONS:
        raise InputError(f"precision: got {precision!r}, expected one of {PRECISIONS}")
    ov = import_openvino()
    model.set_rt_info(precision, PRECISION_KEY)
    ov.save_model(model, str(target), compress_to_fp16=False)
    return {"engine": "openvino", "openvino_version": ov.get_version(), "inference_precision": precision}


def write_ir(onnx_path: str | Path, target: str | Path, precision: str) -> dict:
    """Convert an ONNX file into an OpenVINO IR at ``target`` that runs at ``precision``, with fp32 weights."""
    return {**save_ir(read_onnx(onnx_path), target, precision), "weights": "fp32"}
