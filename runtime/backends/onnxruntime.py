"""The embedded backend: every served model of a bundle in this process, through ONNX Runtime.

One ``InferenceSession`` per model, created on first use and then reused for every request (a
session build optimizes the whole graph: far too slow to repeat per call). Creation is guarded by a
per-model lock so that two threads asking for the same model at once build it once, while calls to
an existing session run concurrently (``InferenceSession.run`` is thread-safe).
"""
from __future__ import annotations

import threading
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..bundle import Bundle
from ..contracts import ModelContract
from ..errors import BackendError, InputError
from .base import Backend
from .openvino import OpenVinoSession, is_openvino_ir

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OrtBackend(Backend):
    """Runs a bundle's ONNX files in-process.

    ``intra_op_threads`` / ``inter_op_threads``: ONNX Runtime's thread pools (None = its default,
    one thread per physical core). ``providers``: execution providers in priority order; those this
    onnxruntime build lacks are refused up front rather than silently dropped. ``variants``:
    ``{model: variant}`` loads ``posterrt engines optimize``'s variant of those models (``int8``,
    ``fp32-opt``, ``openvino-bf16``, ...) instead of the exported file; a UNet's variant covers its
    feature-cache steps (``Bundle.variant_for``). Variants written as
    OpenVINO IR run on OpenVINO (:mod:`.openvino`) with ``intra_op_threads`` as its thread count;
    the rest of the backend does not know the difference.
    """

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 providers: Sequence[str] = DEFAULT_PROVIDERS, optimization_level: str = "all",
                 variants: Mapping[str, str] | None = None):
        super().__init__(bundle)
        self.variants = dict(variants or {})
        for model in self.variants:  # unknown or stale variants fail here
            bundle.model_path(model, verify=False, variant=bundle.variant_for(model, self.variants))
        self.options_template = _session_options(intra_op_threads, inter_op_threads, optimization_level)
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise InputError(f"providers: {missing} are not available in this onnxruntime build; "
                             f"available: {available}")
        self.providers = list(providers)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def session(self, model: str) -> ort.InferenceSession:
        """The model's session, built on first use (hash-checked by the bundle before loading)."""
        session = self._sessions.get(model)
        if session is not None:
            return session
        with self._locks_guard:
            lock = self._locks.setdefault(model, threading.Lock())
        with lock:
            if model not in self._sessions:
                path = self.bundle.model_path(model, variant=self.bundle.variant_for(model, self.variants))
                if is_openvino_ir(path):
                    self._sessions[model] = OpenVinoSession(path, self.options_template.intra_op_num_threads or None)
                    return self._sessions[model]
                try:
                    self._sessions[model] = ort.InferenceSession(str(path), self.options_template,
                                                                 providers=self.providers)
                except Exception as error:  # ORT raises its own Fail/InvalidGraph types
                    raise BackendError(f"model {model!r}: ONNX Runtime cannot load {path.name}: {error}") from None
        return self._sessions[model]

    def load(self, models: Iterable[str]) -> None:
        """Build sessions ahead of the first request (services call this at start-up)."""
        for model in models:
            self.session(model)

    def _run(self, contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(contract.name)
        try:
            outputs = session.run(contract.output_names, inputs)
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(f"model {contract.name!r}: {_engine(session)} failed: {error}") from None
        return dict(zip(contract.output_names, outputs))

    def _bound_run(self, contract: ModelContract, fixed: dict[str, np.ndarray]):
        """A sampling loop's calls through ONNX Runtime's IO binding: the step-invariant inputs are
        bound once, each step binds only its own inputs (ORT reads the numpy buffers in place) and
        runs. OpenVINO variants take the plain path."""
        session = self.session(contract.name)
        if isinstance(session, OpenVinoSession):
            return super()._bound_run(contract, fixed)
        return iobinding_step(session, contract.name, contract.output_names, fixed)

    def close(self) -> None:
        self._sessions.clear()

    def __repr__(self) -> str:
        return f"OrtBackend({str(self.bundle.root)!r}, providers={self.providers})"


def iobinding_step(session: ort.InferenceSession, model: str, output_names: Sequence[str],
                   fixed: Mapping[str, np.ndarray]):
    """``step(inputs) -> outputs`` over ONNX Runtime's IO binding: ``fixed`` is bound once, each
    step binds only its own inputs (ORT reads the numpy buffers in place) and runs. Used by the
    embedded backend's loops and by the server stages inside Triton (triton/stubs)."""
    binding = session.io_binding()
    bound = {name: np.ascontiguousarray(array) for name, array in fixed.items()}  # alive as long as `execute`
    for name, array in bound.items():
        binding.bind_cpu_input(name, array)
    for name in output_names:
        binding.bind_output(name, "cpu")

    def execute(inputs: Mapping[str, np.ndarray], bound=bound) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        for name, array in arrays.items():  # kept alive in `arrays` until the run returns
            binding.bind_cpu_input(name, array)
        try:
            # No RunOptions: onnxruntime 1.32's wrapper looks a graph-capture key up in any RunOptions
            # it is given, and the miss raises and catches a C++ exception, ~44 us per call here
            # (6% of a 0.7 ms PlanNet step). None skips that lookup.
            session.run_with_iobinding(binding)
        except Exception as error:
            raise BackendError(f"model {model!r}: ONNX Runtime failed: {error}") from None
        return dict(zip(output_names, binding.copy_outputs_to_cpu()))

    return execute


def _engine(session) -> str:
    return "OpenVINO" if isinstance(session, OpenVinoSession) else "ONNX Runtime"


_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session_options(intra_op_threads, inter_op_threads, optimization_level) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if optimization_level not in _OPTIMIZATION_LEVELS:
        raise InputError(f"optimization_level: got {optimization_level!r}, expected one of {list(_OPTIMIZATION_LEVELS)}")
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization_level]
    for field, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{field}: got {value!r}, expected a positive integer or None (ONNX Runtime's default)")
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
        # inter-op threads only matter when independent branches of a graph may run in parallel
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    return options
