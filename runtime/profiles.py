"""Optimization profiles (min/opt/max shape of every input) derived from the I/O contracts.

One profile per model. Every dynamic axis takes its range from ``runtime.contracts.DYNAMIC_DIMS``
(optionally narrowed with ``--shapes``); derived axes (``height/8`` for latents, ``height/4`` for
FPN levels) are computed from the same range by the contract itself, so a TensorRT engine, the
ONNX Runtime TensorRT execution provider and the client's request checks agree on what is legal.

Profiles are plain dicts, ``{input: {"min": [...], "opt": [...], "max": [...]}}``, so the Triton
repository builder and the engine manifest can use them without TensorRT.
"""
from __future__ import annotations

import re
from typing import Mapping

from posterrt.runtime.contracts import DYNAMIC_DIMS, DimRange, ModelContract, dim_range
from posterrt.runtime.errors import ContractError, InputError

PROFILE_KEYS = ("min", "opt", "max")

#: With classifier-free guidance the UNet runs uncond + cond in one batch: twice the request batch.
#: Without guidance (scale 1) it runs the request batch alone, so the minimum stays the batch minimum.
CFG_FACTOR = 2


def parse_shapes(text: str | None) -> dict[str, DimRange]:
    """Parse ``--shapes`` (``height=512:768:1024,cfg_batch=2:2:4``; ``width=512`` fixes one size).

    Only the contract's dynamic axes may be set, each within the contract's own range (the runtime
    validates requests against that range, so an engine built past it could never be used) and on
    its ``multiple_of`` grid. Raises InputError naming the entry and what was expected.
    """
    if not text or not text.strip():
        return {}
    ranges: dict[str, DimRange] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, values = entry.partition("=")
        name = name.strip()
        if not sep or not values.strip():
            raise InputError(f"--shapes: entry {entry!r} must be NAME=MIN:OPT:MAX or NAME=SIZE")
        if name not in DYNAMIC_DIMS:
            derived = re.fullmatch(r"([a-z_]+)[/*]\d+", name)
            hint = f"; set {derived.group(1)!r} instead, derived sizes follow it" if derived else ""
            raise InputError(f"--shapes: unknown dimension {name!r} in {entry!r}; expected one of "
                             f"{', '.join(DYNAMIC_DIMS)}{hint}")
        if name in ranges:
            raise InputError(f"--shapes: dimension {name!r} is given twice")
        parts = [p.strip() for p in values.split(":")]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise InputError(f"--shapes: {entry!r} must be {name}=MIN:OPT:MAX or {name}=SIZE with positive integers")
        low, opt, high = (int(p) for p in parts)
        contract_range = DYNAMIC_DIMS[name]
        if not 1 <= low <= opt <= high:
            raise InputError(f"--shapes: {entry!r} must satisfy 1 <= min <= opt <= max, got {low}:{opt}:{high}")
        if low < contract_range.min or high > contract_range.max:
            raise InputError(f"--shapes: {entry!r} leaves the contract range of {name!r} "
                             f"({contract_range.min}..{contract_range.max}); requests are validated against it")
        step = contract_range.multiple_of
        if any(v % step for v in (low, opt, high)):
            raise InputError(f"--shapes: {entry!r}: sizes of {name!r} must be multiples of {step}")
        ranges[name] = DimRange(low, opt, high, step)
    return ranges


def effective_ranges(overrides: Mapping[str, DimRange] | None = None) -> dict[str, DimRange]:
    """The contract ranges with ``overrides`` applied.

    ``cfg_batch`` follows ``batch`` unless it is overridden itself: min = batch min (guidance off),
    opt and max = twice the batch (uncond + cond). With the default batch range this gives the
    contract's own ``cfg_batch`` range, which the tests check.
    """
    overrides = dict(overrides or {})
    ranges = {**DYNAMIC_DIMS, **overrides}
    if "batch" in overrides and "cfg_batch" not in overrides:
        ranges["cfg_batch"] = cfg_range(ranges["batch"])
    return ranges


def cfg_range(batch: DimRange) -> DimRange:
    return DimRange(batch.min, batch.opt * CFG_FACTOR, batch.max * CFG_FACTOR, batch.multiple_of)


def _check_resolved(contract: ModelContract) -> None:
    for spec in contract.inputs:
        for symbol in spec.shape:
            if isinstance(symbol, str) and dim_range(symbol) is None:
                raise ContractError(f"model {contract.name!r}: input {spec.name!r} still has the static dimension "
                                    f"{symbol!r}; resolve the contract with the bundle's static_dims first")


def model_profile(contract: ModelContract, overrides: Mapping[str, DimRange] | None = None) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min": shape, "opt": shape, "max": shape}}`` for a *resolved* contract."""
    _check_resolved(contract)
    ranges = effective_ranges(overrides)
    profile = {}
    for spec in contract.inputs:
        shapes = {}
        for key in PROFILE_KEYS:
            sizes = {name: getattr(rng, key) for name, rng in ranges.items()}
            shapes[key] = [int(v) for v in spec.concrete_shape(sizes)]
        profile[spec.name] = shapes
    return profile


def profile_ranges(contract: ModelContract, overrides: Mapping[str, DimRange] | None = None) -> dict[str, dict]:
    """The ranges of the dynamic axes this model's inputs use (recorded in the engine manifest)."""
    ranges = effective_ranges(overrides)
    return {name: {"min": ranges[name].min, "opt": ranges[name].opt, "max": ranges[name].max}
            for name in contract.input_dims()}


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's TensorRT execution provider (the gpu-onnx flavor)
# ---------------------------------------------------------------------------------------------
def ort_shape_string(profile: Mapping[str, Mapping[str, list]], key: str) -> str:
    """``"sample:2x4x64x64,timestep:2"``: the format of trt_profile_{min,opt,max}_shapes (trtexec's)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[key])}" for name, shapes in profile.items())


def ort_trt_provider_options(contract: ModelContract, *, overrides: Mapping[str, DimRange] | None = None,
                             engine_cache_dir: str | None = None, timing_cache_dir: str | None = None,
                             opt_level: int = 3, workspace_gb: float = 4.0, device_id: int = 0,
                             weakly_typed_fp16: bool = False) -> dict[str, str]:
    """Options for ``("TensorrtExecutionProvider", options)`` built from the model's profile.

    Precision follows the engines' policy: feed the EP the ONNX that ``engines.precision`` wrote
    for the wanted precision and leave ``trt_fp16_enable`` off, so ONNX Runtime builds a strongly
    typed network (works with TensorRT 10 and 11, where the FP16 builder flag is gone) with the
    fp32 islands the converter kept. ``weakly_typed_fp16`` turns on the EP's own fp16 autotuning
    on an fp32 ONNX instead (TensorRT <= 10 only; no fp32 islands).
    """
    profile = model_profile(contract, overrides)
    options = {
        "device_id": str(device_id),
        "trt_profile_min_shapes": ort_shape_string(profile, "min"),
        "trt_profile_opt_shapes": ort_shape_string(profile, "opt"),
        "trt_profile_max_shapes": ort_shape_string(profile, "max"),
        "trt_fp16_enable": "True" if weakly_typed_fp16 else "False",
        "trt_builder_optimization_level": str(int(opt_level)),
        "trt_max_workspace_size": str(int(workspace_gb * (1 << 30))),
    }
    if engine_cache_dir:
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(engine_cache_dir))
    if timing_cache_dir:
        options.update(trt_timing_cache_enable="True", trt_timing_cache_path=str(timing_cache_dir))
    return options


def ort_gpu_providers(contract: ModelContract, *, tensorrt: bool = True, device_id: int = 0, **trt_options) -> list:
    """The provider list of a gpu-onnx session: TensorRT EP (if wanted), then CUDA EP for what
    TensorRT does not take, then CPU."""
    providers = []
    if tensorrt:
        providers.append(("TensorrtExecutionProvider",
                          ort_trt_provider_options(contract, device_id=device_id, **trt_options)))
    providers.append(("CUDAExecutionProvider", {"device_id": str(device_id)}))
    providers.append("CPUExecutionProvider")
    return providers
