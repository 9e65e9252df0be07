"""`posterrt engines build`: one TensorRT plan per served model, from a bundle's ONNX.

Per model: clean the ONNX and apply the precision policy (``cleanup.prepare_onnx``), parse it into
a strongly typed network, add one optimization profile from the contracts, build with a shared
timing cache, and write ``<model>.plan`` + ``<model>.build.log`` + the manifest entry.

``tensorrt`` is imported only inside :func:`import_tensorrt`, so this module loads (and its
profile / option logic is tested) on machines without a GPU.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import MODEL_NAMES
from posterrt.runtime.errors import InputError, PosterRTError

from .cleanup import prepare_onnx
from .manifest import EngineError, current_gpu, engine_entry, update_entry
from .onnx_operators import blocking, check_file
from .precision import check_precision
from posterrt.runtime.profiles import model_profile, profile_ranges

#: UNets get REFIT so a new style adapter / LoRA (merged into the weights) swaps in without a rebuild.
DEFAULT_REFITTABLE = ("bg_unet",)
MAX_OPT_LEVEL = 5


class TensorRTMissing(PosterRTError):
    """TensorRT's Python package is not importable here."""


#: TensorRT majors posterrt builds with: 10.x opts in to strong typing with the STRONGLY_TYPED flag
#: (and has OnnxParserRefitter since 10.0); 11.x is always strongly typed and accepts the flag.
SUPPORTED_TENSORRT = (10, 11)
INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU"


def import_tensorrt():
    """TensorRT's module, or one line saying why not. ``tensorrt-stubs`` alone makes ``import
    tensorrt`` succeed (a namespace package of .pyi files, no ``Builder``): that is not TensorRT."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTMissing(f"TensorRT is not installed ({INSTALL_HINT})") from None
    version = getattr(tensorrt, "__version__", None)
    if version is None or not hasattr(tensorrt, "Builder"):
        raise TensorRTMissing(f"TensorRT is not installed, only its type stubs ({INSTALL_HINT})")
    if int(version.split(".")[0]) not in SUPPORTED_TENSORRT:
        raise TensorRTMissing(f"TensorRT {version} is installed; posterrt builds with TensorRT "
                              f"{' or '.join(f'{major}.x' for major in SUPPORTED_TENSORRT)}")
    return tensorrt


@dataclass
class BuildOptions:
    precision: str = "fp16"
    opt_level: int = 3
    workspace_gb: float = 8.0
    timing_cache: Path | None = None
    refittable: tuple = DEFAULT_REFITTABLE
    shapes: dict = field(default_factory=dict)  # --shapes overrides: {dim: DimRange}
    clean_tool: str = "auto"

    def __post_init__(self):
        check_precision(self.precision)
        if not 0 <= int(self.opt_level) <= MAX_OPT_LEVEL:
            raise InputError(f"--opt-level: got {self.opt_level}, expected 0..{MAX_OPT_LEVEL} (TensorRT's builder optimization level)")
        if not self.workspace_gb > 0:
            raise InputError(f"--workspace-gb: got {self.workspace_gb}, expected a positive size in GiB")

    def record(self, model: str) -> dict:
        """The options as the manifest keeps them (JSON)."""
        return {"opt_level": int(self.opt_level), "workspace_gb": self.workspace_gb,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "refittable": model in self.refittable, "strongly_typed": True,
                "tf32": self.precision != "fp32", "clean_tool": self.clean_tool,
                "shapes": {k: asdict(v) for k, v in self.shapes.items()}}


# ---------------------------------------------------------------------------------------------
# The TensorRT part: one ONNX file -> one serialized plan
# ---------------------------------------------------------------------------------------------
def file_logger(trt, path: Path):
    """A trt.ILogger that keeps the build's messages (INFO and up) in ``path``."""

    class FileLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.handle = open(path, "a", encoding="utf-8")

        def log(self, severity, msg):
            if severity != trt.ILogger.Severity.VERBOSE:
                self.handle.write(f"[{getattr(severity, 'name', severity)}] {msg}\n")
                self.handle.flush()

        def close(self):
            self.handle.close()

    return FileLogger()


def load_plugins(trt, logger, plugins) -> None:
    """Register TensorRT's own plugins (libnvinfer_plugin) when a graph needs one: the ONNX parser
    imports RoiAlign as ROIAlign_TRT, and parsing, refitting and deserializing all look it up."""
    if plugins and not trt.init_libnvinfer_plugins(logger, ""):
        raise EngineError(f"TensorRT could not load its plugin library (libnvinfer_plugin), needed for {', '.join(plugins)}")


def build_plan(trt, onnx_path: Path, profile: dict, *, precision: str, opt_level: int, workspace_gb: float,
               refittable: bool, timing_cache: bytes, logger, plugins=()) -> tuple[bytes, bytes]:
    """Build one plan. Returns (plan bytes, updated timing cache bytes)."""
    load_plugins(trt, logger, plugins)
    builder = trt.Builder(logger)
    # Strongly typed: the ONNX's types are the precision (see engines/precision.py). TensorRT 11
    # builds every network this way; on 10.x the flag opts in.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(network_inputs) != sorted(profile):
        raise EngineError(f"{onnx_path.name}: network inputs {network_inputs} do not match the contract's {list(profile)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(opt_level)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would cost ~1e-3 of parity
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    optimization_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        optimization_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(optimization_profile)

    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version: start a fresh one rather than fail
        logger.log(trt.ILogger.Severity.WARNING, "timing cache does not match this GPU/TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path.name}; see the build log")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


# ---------------------------------------------------------------------------------------------
# The command: every requested model of a bundle
# ---------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, flush it to disk, then rename it over
    ``path``: an interrupted write (Ctrl-C, kill, power loss) leaves the old file or none, never
    half a plan under the real name. The temporary name is never read by anything."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself must reach the disk too
        os.fsync(directory)
    finally:
        os.close(directory)


def parser_check(prepared: Path, model: str) -> dict:
    """The operator report of the ONNX the parser is about to get; a graph it would reject stops
    here, naming the operator, rather than deep in TensorRT's log."""
    operators = check_file(prepared, model)
    if operators["verdict"] == "rejected":
        raise EngineError(f"{model}: TensorRT's ONNX parser would reject the prepared graph: {blocking(operators)[0]}; "
                          f"serve {model} with the gpu-onnx flavor (posterrt repo build --flavor gpu-onnx)")
    return operators


def plan_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_engines(bundle_dir, out_dir, models: list[str] | None, options: BuildOptions, progress: bool = True) -> dict:
    """Build ``models`` (None: every model of the bundle); returns the engines manifest."""
    trt = import_tensorrt()  # first: without TensorRT nothing else is worth doing
    bundle = Bundle(bundle_dir)
    models = [m for m in MODEL_NAMES if m in bundle.models] if models is None else models
    bundle.require(models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu = current_gpu()
    cache_path = Path(options.timing_cache) if options.timing_cache else out / "timing.cache"
    options.timing_cache = cache_path
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
    manifest = {"engines": {}}
    bar = tqdm(models, desc="engines", unit="model", disable=not progress)
    for model in bar:
        bar.set_postfix_str(model)
        contract = bundle.contract(model)
        profile = model_profile(contract, options.shapes)
        log_path = out / f"{model}.build.log"
        log_path.write_text(f"posterrt engines build {model}: precision {options.precision}, "
                            f"options {options.record(model)}\nprofile {profile}\n")
        logger = file_logger(trt, log_path)
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"posterrt-{model}-", dir=out) as work:
                prepared = Path(work) / f"{model}.onnx"
                report = prepare_onnx(bundle.model_path(model), prepared, model_name=model,
                                      precision=options.precision, tool=options.clean_tool,
                                      refittable=model in options.refittable)
                logger.log(trt.ILogger.Severity.INFO, f"prepared ONNX: {report}")
                operators = parser_check(prepared, model)
                plan, timing_cache = build_plan(
                    trt, prepared, profile, precision=options.precision, opt_level=options.opt_level,
                    workspace_gb=options.workspace_gb, refittable=model in options.refittable,
                    timing_cache=timing_cache, logger=logger, plugins=operators["plugins"])
        finally:
            logger.close()
        write_atomic(out / f"{model}.plan", plan)
        write_atomic(cache_path, timing_cache)  # after every model: an interrupted run keeps its timings
        entry = engine_entry(
            model=model, plan=f"{model}.plan", precision=options.precision, profile=profile,
            ranges=profile_ranges(contract, options.shapes), gpu=gpu, tensorrt_version=trt.__version__,
            source_onnx_sha256=bundle.models[model].sha256, bundle=str(Path(bundle_dir).resolve()),
            build_options=options.record(model), build_seconds=time.perf_counter() - started,
            plan_sha256=plan_digest(plan))
        entry["onnx_prepare"] = {k: report[k] for k in ("tool", "skipped_optimizations", "nodes_before",
                                                          "nodes_after", "fp32_nodes", "roi_aligns_rewritten")}
        entry["plugins"] = operators["plugins"]  # whoever loads the plan must register these
        manifest = update_entry(out, model, entry)
    return manifest
