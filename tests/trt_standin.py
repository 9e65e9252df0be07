"""A stand-in ``tensorrt`` module held to TensorRT's own Python API, for machines without a GPU.

TensorRT cannot be installed here, so the engine tests run ``posterrt engines build|refit`` and
``benchmarks/gpu_check.py`` against this module. A stand-in that accepts whatever it is told would
let a misspelt attribute or a removed method reach a user's first build; this one is checked
against ``tensorrt-stubs`` (the ``.pyi`` of TensorRT 10.13's bindings, installed with ``--no-deps``):

* every class, method and property a stand-in class defines must exist in the stubs under the
  same name, with the stubs' parameter names (checked when the class is defined);
* every call is bound to the stubs' signature (any of its overloads) and its arguments are
  type-checked against the stubs' annotations where they name a type (int, str, bool, a buffer,
  another stubbed class or enum); attribute writes must hit a writable stub attribute;
* enums carry exactly the stubs' members with the stubs' values (read from the stubs' comments);
* anything else (a name the stubs lack, or one the stand-in does not implement) raises
  ``AttributeError`` naming ``tensorrt.Class.member``.

``standin("11.4.0.106")`` is TensorRT 11: the same API less what NVIDIA's 10.x -> 11.x migration guide
lists as removed from Python (``TENSORRT_11_REMOVED``); strong typing is unconditional there and
the STRONGLY_TYPED flag is accepted and ignored.

The behaviour is a recording: the "plan" is JSON of what reached the builder, so tests can see
that the prepared ONNX, the flags, the profile and the timing cache arrived as intended.
"""
from __future__ import annotations

import ast
import ctypes
import enum
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

STUBS_VERSION = "10.13"

#: NVIDIA, "Removed Python APIs and Replacements" (TensorRT 10.x -> 11.x migration guide,
#: docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html):
#: the weak-typing and implicit-quantization API that posterrt must never touch.
TENSORRT_11_REMOVED = {
    "BuilderFlag": ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"),
    "IBuilderConfig": ("int8_calibrator", "set_calibration_profile", "get_calibration_profile",
                       "set_quantization_flag", "get_quantization_flag", "quantization_flags",
                       "clear_quantization_flag"),
    "Builder": ("platform_has_fast_fp16", "platform_has_fast_int8"),
}


# ---------------------------------------------------------------------------------------------
# The API as the stubs declare it
# ---------------------------------------------------------------------------------------------
@dataclass
class StubClass:
    name: str
    methods: dict = field(default_factory=dict)      # name -> [inspect.Signature, ...] (overloads)
    properties: dict = field(default_factory=dict)   # name -> (annotation, writable)
    members: dict = field(default_factory=dict)      # enum member / class constant -> int value
    nested: dict = field(default_factory=dict)       # name -> StubClass

    def has(self, name: str) -> bool:
        return name in self.methods or name in self.properties or name in self.members or name in self.nested


def stubs_path() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tensorrt-stubs is not installed (python -m pip install --no-deps tensorrt-stubs)")
    return Path(list(spec.submodule_search_locations)[0]) / "tensorrt.pyi"


def _parsable(lines: list[str]) -> ast.Module:
    """The stubs as an AST. pybind11-stubgen wrote five lines Python cannot parse (a parameter
    named ``in``, a required parameter after defaulted ones); those are repaired, not dropped."""
    while True:
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as error:
            index = error.lineno - 1
            repaired = re.sub(r"\bin:", "in_:", lines[index])
            if repaired == lines[index]:
                repaired = re.sub(r"\s*=\s*None", "", lines[index])
            if repaired == lines[index]:
                raise
            lines[index] = repaired


def _signature(function: ast.FunctionDef) -> inspect.Signature:
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    parameters = []
    for index, (argument, default) in enumerate(zip(positional, defaults)):
        kind = inspect.Parameter.POSITIONAL_ONLY if index < len(arguments.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters.append(inspect.Parameter(argument.arg, kind, annotation=_annotation(argument),
                                            default=inspect.Parameter.empty if default is None else ...))
    if arguments.vararg:
        parameters.append(inspect.Parameter(arguments.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        parameters.append(inspect.Parameter(argument.arg, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(argument),
                                            default=inspect.Parameter.empty if default is None else ...))
    if arguments.kwarg:
        parameters.append(inspect.Parameter(arguments.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _annotation(argument: ast.arg) -> str:
    return ast.unparse(argument.annotation) if argument.annotation is not None else "..."


def _stub_class(node: ast.ClassDef, lines: list[str]) -> StubClass:
    stub = StubClass(node.name)
    for item in node.body:
        if isinstance(item, ast.ClassDef):
            stub.nested[item.name] = _stub_class(item, lines)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            annotation = ast.unparse(item.annotation)
            if annotation.startswith("typing.ClassVar"):
                value = re.search(r": (-?\d+)>", lines[item.lineno - 1])
                if value:
                    stub.members[item.target.id] = int(value.group(1))
            else:
                stub.properties[item.target.id] = (annotation, True)  # a pybind readwrite attribute
        elif isinstance(item, ast.FunctionDef):
            decorators = [ast.unparse(d) for d in item.decorator_list]
            if "property" in decorators:
                stub.properties[item.name] = (ast.unparse(item.returns) if item.returns else "...", False)
            elif any(d.endswith(".setter") for d in decorators):
                stub.properties[item.name] = (stub.properties.get(item.name, ("...",))[0], True)
            else:
                stub.methods.setdefault(item.name, []).append(_signature(item))
    return stub


@functools.lru_cache(maxsize=None)
def stub_api() -> dict:
    """Every class and module-level function of the stubs: {name: StubClass | [Signature]}."""
    lines = stubs_path().read_text().splitlines()
    api = {}
    for node in _parsable(lines).body:
        if isinstance(node, ast.ClassDef):
            api[node.name] = _stub_class(node, lines)
        elif isinstance(node, ast.FunctionDef):
            api.setdefault(node.name, []).append(_signature(node))
    return api


def stub_class(path: str) -> StubClass:
    """``"ILogger.Severity"`` -> its StubClass; KeyError naming it when the stubs lack it."""
    head, *rest = path.split(".")
    found = stub_api().get(head)
    for part in rest:
        found = found.nested.get(part) if isinstance(found, StubClass) else None
    if not isinstance(found, StubClass):
        raise KeyError(f"tensorrt.{path} is not a class of TensorRT {STUBS_VERSION}'s API (tensorrt-stubs)")
    return found


# ---------------------------------------------------------------------------------------------
# Checking stand-in classes and calls against it
# ---------------------------------------------------------------------------------------------
class StubMismatch(TypeError):
    """A call or a stand-in definition that TensorRT's real API would not accept."""


def _parameters(signature: inspect.Signature) -> list[str]:
    return [p.name for p in signature.parameters.values() if p.name != "self"]


class API:
    """One TensorRT version's API: the stubs, less what that version removed."""

    def __init__(self, version: str, removed: dict | None = None):
        self.version = version
        base = TENSORRT_11_REMOVED if int(version.split(".")[0]) >= 11 else {}
        self.removed = {owner: (*base.get(owner, ()), *(removed or {}).get(owner, ())) for owner in {*base, *(removed or {})}}
        self.classes: dict[str, type] = {}  # stub name -> stand-in class

    def lacks(self, owner: str, name: str) -> bool:
        return name in self.removed.get(owner, ())

    def describe(self, owner: str, name: str) -> str:
        return f"tensorrt.{owner}.{name}"

    # -- enums ------------------------------------------------------------------------------------
    def enum(self, path: str) -> type:
        stub = stub_class(path)
        owner = path.split(".")[-1]
        members = {k: v for k, v in stub.members.items() if not self.lacks(path, k)}
        api = self

        class StubEnumMeta(enum.EnumMeta):
            def __getattr__(cls, name):
                if name.startswith("_"):
                    raise AttributeError(name)
                raise AttributeError(api.missing(path, name, stub))

        cls = StubEnumMeta(owner, (TensorRTEnum,), _enum_namespace(StubEnumMeta, owner, (TensorRTEnum,), members))
        cls.__qualname__ = path
        self.classes[path] = cls
        return cls

    def missing(self, owner: str, name: str, stub: StubClass | None) -> str:
        where = self.describe(owner, name)
        if self.lacks(owner, name):
            source = " (NVIDIA's 10.x -> 11.x migration guide)" if name in TENSORRT_11_REMOVED.get(owner, ()) else ""
            return f"{where} was removed in TensorRT {self.version}{source}"
        if stub is not None and stub.has(name):
            return f"{where} is in TensorRT's API but the stand-in does not implement it (tests/trt_standin.py)"
        return f"{where} is not in TensorRT {STUBS_VERSION}'s Python API (tensorrt-stubs)"

    # -- classes ----------------------------------------------------------------------------------
    def implements(self, path: str):
        """Class decorator: hold a stand-in class to the stubs' class ``path``."""

        def wrap(cls):
            stub = stub_class(path)
            for name, value in list(vars(cls).items()):
                if name.startswith("_") and name != "__init__":
                    continue
                if name != "__init__" and (not stub.has(name) or self.lacks(path, name)):
                    raise StubMismatch(self.missing(path, name, stub) + " (defined by the stand-in)")
                if isinstance(value, (property, type)):  # a property, or a nested class (ILogger.Severity)
                    continue
                if name == "__init__" and "__init__" not in stub.methods:
                    # TensorRT makes these itself (no Python constructor): the stand-in does too, via _create
                    cls._create = classmethod(_creator(value))
                    cls.__init__ = _no_constructor(self.describe(path, "__init__"))
                    continue
                if callable(value):
                    overloads = stub.methods.get(name)
                    if overloads is None:
                        raise StubMismatch(f"{self.describe(path, name)} is not a method in the stubs")
                    mine = _parameters(inspect.signature(value))
                    if not any(mine == _parameters(s) for s in overloads):
                        raise StubMismatch(f"the stand-in's {self.describe(path, name)}({', '.join(mine)}) does not have "
                                           f"the stubs' parameters: {' | '.join(str(s) for s in overloads)}")
                    setattr(cls, name, self._checked(path, name, value, overloads))
            cls.__getattr__ = lambda obj, name: self._missing_attribute(path, stub, name)
            cls.__setattr__ = self._guarded_setattr(path, stub, cls)
            cls.__qualname__ = cls.__name__ = path.split(".")[-1]
            self.classes[path] = cls
            return cls

        return wrap

    def _missing_attribute(self, path, stub, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(self.missing(path, name, stub))

    def _guarded_setattr(self, path, stub, cls):
        def setattr_(obj, name, value):
            if type(obj) is cls and not name.startswith("_"):  # user subclasses (a logger) may keep state
                annotation, writable = stub.properties.get(name, (None, False))
                if not writable or self.lacks(path, name):
                    raise AttributeError(f"{self.describe(path, name)} cannot be set: "
                                         + (self.missing(path, name, stub) if annotation is None else "read-only in the stubs"))
                self._check_type(f"{self.describe(path, name)} = ", value, annotation)
            object.__setattr__(obj, name, value)

        return setattr_

    def _checked(self, path, name, function, overloads):
        api = self

        @functools.wraps(function)
        def call(*args, **kwargs):
            errors = []
            for signature in overloads:
                try:
                    bound = signature.bind(*args, **kwargs)
                except TypeError as error:
                    errors.append(f"{signature}: {error}")
                    continue
                try:
                    for parameter, value in bound.arguments.items():
                        if parameter != "self":
                            api._check_type(f"{api.describe(path, name)} argument {parameter}=", value,
                                            signature.parameters[parameter].annotation)
                except StubMismatch as error:
                    errors.append(str(error))
                    continue
                return function(*args, **kwargs)
            raise StubMismatch(f"{api.describe(path, name)}: the call's arguments fit none of TensorRT's signatures: "
                               + "; ".join(errors))

        return call

    def _check_type(self, where: str, value, annotation: str | None) -> None:
        ok = {
            "int": lambda v: isinstance(v, int) or hasattr(type(v), "__index__"),
            "bool": lambda v: isinstance(v, (bool, int)),
            "float": lambda v: isinstance(v, (int, float)),
            "str": lambda v: isinstance(v, str),
            "typing_extensions.Buffer": _is_buffer,
            "Dims": lambda v: isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v),
            "tuple": lambda v: isinstance(v, tuple),
            "list": lambda v: isinstance(v, list),
        }.get(annotation)
        if ok is None and annotation in self.classes:
            expected = self.classes[annotation]
            ok = lambda v: isinstance(v, expected)  # noqa: E731
        if ok is not None and not ok(value):
            raise StubMismatch(f"{where}{value!r}: TensorRT expects {annotation}, got {type(value).__name__}")


class TensorRTEnum(enum.Enum):
    """pybind11 enums convert to int (``1 << int(flag)``) and have ``name`` / ``value``."""

    def __int__(self):
        return self.value

    __index__ = __int__


def _enum_namespace(meta, name, bases, members):
    namespace = meta.__prepare__(name, bases)
    for key, value in members.items():
        namespace[key] = value
    return namespace


def _creator(init):
    def create(cls, *args):
        obj = object.__new__(cls)
        init(obj, *args)
        return obj

    return create


def _no_constructor(where):
    def refuse(self, *args, **kwargs):
        raise StubMismatch(f"{where}: TensorRT's class has no Python constructor (its objects come from TensorRT)")

    return refuse


def _is_buffer(value) -> bool:
    try:
        memoryview(value)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The stand-in module
# ---------------------------------------------------------------------------------------------
_ONNX_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
               "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
               "tensor(bool)": onnx.TensorProto.BOOL}


class StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        api = self.__dict__["api"]
        if name in stub_api():
            raise AttributeError(f"tensorrt.{name} is in TensorRT's API but the stand-in does not implement it "
                                 f"(tests/trt_standin.py)")
        raise AttributeError(f"tensorrt.{name} is not in TensorRT {STUBS_VERSION}'s Python API (tensorrt-stubs); "
                             f"stand-in for TensorRT {api.version}")


def standin(version: str = "10.13.0.35", removed: dict | None = None):
    """A fresh stand-in ``tensorrt`` module for ``version`` (10.x or 11.x); ``trt.calls`` records.
    ``removed``: more members to take away ({class: names}), for branches a future TensorRT may take."""
    api = API(version, removed)
    trt = StandInModule("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec asks (torch._dynamo)
    trt.__version__ = version
    trt.api = api
    trt.calls = calls = {"configs": [], "refits": [], "plugins": [], "contexts": []}

    for path in ("NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "DataType", "ILogger.Severity",
                 "TensorIOMode"):
        api.enum(path)
    Severity = api.classes["ILogger.Severity"]
    DataType = api.classes["DataType"]

    @api.implements("ILogger")
    class ILogger:
        Severity = api.classes["ILogger.Severity"]

        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    @api.implements("IHostMemory")
    class IHostMemory:
        def __init__(self, data: bytes):
            object.__setattr__(self, "_data", bytes(data))

        def __bytes__(self):  # the real one exposes the buffer protocol
            return self._data

        nbytes = property(lambda self: len(self._data))

    @api.implements("ITensor")
    class ITensor:
        def __init__(self, name):
            object.__setattr__(self, "_name", name)

        name = property(lambda self: self._name)

    @api.implements("INetworkDefinition")
    class INetworkDefinition:
        def __init__(self, flags):
            object.__setattr__(self, "_flags", flags)
            object.__setattr__(self, "_inputs", [])
            object.__setattr__(self, "_model", None)

        num_inputs = property(lambda self: len(self._inputs))
        flags = property(lambda self: self._flags)

        def get_input(self, index):
            return ITensor._create(self._inputs[index])

    @api.implements("ParserError")
    class ParserError:
        def __init__(self, text):
            object.__setattr__(self, "_text", text)

        def __str__(self):
            return self._text

        def desc(self):
            return self._text

    def _check_logger(logger):
        # TensorRT calls log(severity, msg) positionally: the logger must take exactly that
        if not isinstance(logger, ILogger):
            raise StubMismatch(f"a TensorRT logger must derive from tensorrt.ILogger, got {type(logger).__name__}")
        inspect.signature(logger.log).bind(Severity.INFO, "message")

    @api.implements("OnnxParser")
    class OnnxParser:
        def __init__(self, network, logger):
            _check_logger(logger)
            object.__setattr__(self, "_network", network)
            object.__setattr__(self, "_errors", [])

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index):
            return self._errors[index]

        def parse_from_file(self, model):
            loaded = onnx.load(model)  # the real prepared file: its inputs are what TensorRT would see
            unsupported = [n.op_type for n in loaded.graph.node if n.op_type in trt.unsupported_ops]
            if unsupported:
                self._errors.append(ParserError._create(f"In node 0 (importFallbackPluginImporter): UNSUPPORTED_NODE: "
                                                f"Assertion failed: creator && \"Plugin not found, {unsupported[0]}\""))
                return False
            object.__setattr__(self._network, "_inputs", [i.name for i in loaded.graph.input])
            object.__setattr__(self._network, "_model", loaded)
            object.__setattr__(self._network, "_path", model)
            return True

    trt.unsupported_ops = ()  # tests set op types the stand-in parser rejects

    @api.implements("IOptimizationProfile")
    class IOptimizationProfile:
        def __init__(self):
            object.__setattr__(self, "_shapes", {})

        def set_shape(self, input, min, opt, max):
            self._shapes[input] = (list(min), list(opt), list(max))

        def get_shape(self, input):
            return self._shapes[input]

    @api.implements("ITimingCache")
    class ITimingCache:
        def __init__(self, data):
            object.__setattr__(self, "_data", bytes(data))

        def serialize(self):
            return IHostMemory._create(self._data + b"+")

    @api.implements("IBuilderConfig")
    class IBuilderConfig:
        def __init__(self):
            # TensorRT's defaults: TF32 on where the GPU has it, no other flag
            flag = api.classes["BuilderFlag"]
            flags = {flag.TF32} if "TF32" in flag.__members__ else set()
            for name, value in (("_flags", flags), ("_pools", {}), ("_profiles", []), ("_cache", None)):
                object.__setattr__(self, name, value)
            object.__setattr__(self, "builder_optimization_level", 3)
            calls["configs"].append(self)

        def set_memory_pool_limit(self, pool, pool_size):
            self._pools[pool] = pool_size

        def get_memory_pool_limit(self, pool):
            return self._pools.get(pool, 0)

        def set_flag(self, flag):
            self._flags.add(flag)

        def clear_flag(self, flag):
            self._flags.discard(flag)

        def get_flag(self, flag):
            return flag in self._flags

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)
            return len(self._profiles) - 1

        num_optimization_profiles = property(lambda self: len(self._profiles))

        def create_timing_cache(self, serialized_timing_cache):
            return ITimingCache._create(bytes(memoryview(serialized_timing_cache)))

        def set_timing_cache(self, cache, ignore_mismatch):
            object.__setattr__(self, "_cache", cache)
            return not cache._data.startswith(b"other-gpu")

        def get_timing_cache(self):
            return self._cache

    @api.implements("Builder")
    class Builder:
        def __init__(self, logger):
            _check_logger(logger)
            object.__setattr__(self, "_logger", logger)

        def create_network(self, flags=0):
            return INetworkDefinition._create(flags)

        def create_builder_config(self):
            return IBuilderConfig._create()

        def create_optimization_profile(self):
            return IOptimizationProfile._create()

        def build_serialized_network(self, network, config):
            self._logger.log(Severity.INFO, "building")
            model = network._model
            plan = {"inputs": network._inputs, "network_flags": network.flags,
                    "builder_flags": sorted(f.name for f in config._flags),
                    "initializer_types": sorted({t.data_type for t in model.graph.initializer}),
                    "outputs": [o.name for o in model.graph.output], "refitted_from": None, "onnx": network._path,
                    "profile": config._profiles[0]._shapes if config._profiles else {}}
            return IHostMemory._create(json.dumps(plan).encode())

    @api.implements("IExecutionContext")
    class IExecutionContext:
        def __init__(self, engine):
            for name, value in (("_engine", engine), ("_shapes", {}), ("_addresses", {}), ("_runs", 0), ("_session", None)):
                object.__setattr__(self, name, value)
            calls["contexts"].append(self)

        def set_input_shape(self, name, shape):
            low, _, high = self._engine._plan["profile"][name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False  # outside the profile: TensorRT logs an error and answers False
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if name in self._shapes:
                return self._shapes[name]
            return self._compute()[name].shape

        def set_tensor_address(self, name, memory):
            self._addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            # the "engine" is ONNX Runtime on the plan's ONNX, reading and writing host memory at the
            # bound addresses: binding, shapes and dtypes are exercised, not a GPU
            for name, array in self._compute().items():
                ctypes.memmove(self._addresses[name], np.ascontiguousarray(array).ctypes.data, array.nbytes)
            object.__setattr__(self, "_runs", self._runs + 1)
            return True

        def _compute(self):
            import onnxruntime

            path = self._engine._plan["onnx"]
            if self._session is None or self._session[0] != path:  # a refit points the plan at new weights
                object.__setattr__(self, "_session", (path, onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])))
            session = self._session[1]
            feeds = {}
            for spec in session.get_inputs():
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(_ONNX_TYPES[spec.type]))
                shape = self._shapes[spec.name]
                count = int(np.prod(shape)) * dtype.itemsize
                raw = (ctypes.c_byte * count).from_address(self._addresses[spec.name])
                feeds[spec.name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            names = [o.name for o in session.get_outputs()]
            return dict(zip(names, session.run(names, feeds)))

    @api.implements("ICudaEngine")
    class ICudaEngine:
        def __init__(self, plan):
            object.__setattr__(self, "_plan", json.loads(bytes(memoryview(plan))))

        def serialize(self):
            return IHostMemory._create(json.dumps(self._plan).encode())

        num_io_tensors = property(lambda self: len(self._plan["inputs"]) + len(self._plan["outputs"]))
        refittable = property(lambda self: "REFIT" in self._plan["builder_flags"])

        def get_tensor_name(self, index):
            return (self._plan["inputs"] + self._plan["outputs"])[index]

        def get_tensor_mode(self, name):
            mode = api.classes["TensorIOMode"]
            return mode.INPUT if name in self._plan["inputs"] else mode.OUTPUT

        def get_tensor_dtype(self, name):
            model = onnx.load(self._plan["onnx"], load_external_data=False)
            elem = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}[name]
            return {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                    onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.INT32: DataType.INT32,
                    onnx.TensorProto.BOOL: DataType.BOOL}[elem]

        def create_execution_context(self, strategy=...):
            return IExecutionContext._create(self)

    @api.implements("Runtime")
    class Runtime:
        def __init__(self, logger):
            _check_logger(logger)

        def deserialize_cuda_engine(self, serialized_engine):
            return ICudaEngine._create(serialized_engine)

    @api.implements("Refitter")
    class Refitter:
        def __init__(self, engine, logger):
            _check_logger(logger)
            if not engine.refittable:
                raise StubMismatch("Refitter of an engine built without REFIT")  # TensorRT logs an error too
            object.__setattr__(self, "_engine", engine)
            object.__setattr__(self, "_source", None)
            object.__setattr__(self, "_path", None)

        def get_missing_weights(self):
            return []

        def get_all_weights(self):
            return ["w"] * 7

        def refit_cuda_engine(self):
            self._engine._plan["refitted_from"] = self._source
            self._engine._plan["onnx"] = self._path
            return True

    @api.implements("OnnxParserRefitter")
    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            _check_logger(logger)
            object.__setattr__(self, "_refitter", refitter)

        num_errors = property(lambda self: 0)

        def get_error(self, index):
            raise IndexError(index)

        def refit_from_file(self, model):
            loaded = onnx.load(model)
            object.__setattr__(self._refitter, "_source", sorted({t.data_type for t in loaded.graph.initializer}))
            object.__setattr__(self._refitter, "_path", model)
            calls["refits"].append(model)
            return True

    def init_libnvinfer_plugins(logger, namespace):
        stub_api()["init_libnvinfer_plugins"][0].bind(logger, namespace)
        calls["plugins"].append(namespace)
        return True

    for path, cls in api.classes.items():
        if "." not in path:
            setattr(trt, path, cls)
    trt.ILogger = ILogger
    trt.init_libnvinfer_plugins = init_libnvinfer_plugins
    return trt
