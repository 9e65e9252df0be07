"""``manifest.json`` of an engines folder: what each TensorRT plan was built from, for which GPU and
TensorRT version, with which profile, precision and options.

A serialized TensorRT engine only runs on the TensorRT version that built it and is tuned for one
GPU model (compute capability decides whether it loads at all). Checking the manifest before
deserializing turns TensorRT's opaque failure into a message that says to rebuild.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from posterrt.runtime.errors import BackendError

MANIFEST = "manifest.json"
FORMAT = "posterrt-engines"
FORMAT_VERSION = 1


class EngineError(BackendError):
    """A TensorRT engine cannot be built, refit or used (wrong GPU, TensorRT version, stale source)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


def current_gpu(device: int = 0) -> GpuInfo:
    """The GPU engines are built for: nvidia-smi (no torch needed); torch.cuda as a fallback."""
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and "," in result.stdout:
            name, capability = (part.strip() for part in result.stdout.strip().splitlines()[0].rsplit(",", 1))
            return GpuInfo(name, capability)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}")
    except ImportError:
        pass
    raise EngineError("no NVIDIA GPU found (nvidia-smi and torch.cuda see none); TensorRT engines are built "
                      "and run on the GPU that serves them")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "version": FORMAT_VERSION, "engines": {}}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise EngineError(f"engines manifest {path} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise EngineError(f"engines manifest {path} has format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; build the engines again")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Atomic replace: a reader sees the old manifest or the new one, never half of one."""
    from .build import write_atomic

    write_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def update_entry(folder: str | os.PathLike, model: str, entry: dict) -> dict:
    manifest = read_manifest(folder)
    manifest["engines"][model] = entry
    write_manifest(folder, manifest)
    return manifest


def engine_entry(*, model: str, plan: str, precision: str, profile: dict, ranges: dict, gpu: GpuInfo,
                 tensorrt_version: str, source_onnx_sha256: str, bundle: str, build_options: dict,
                 build_seconds: float, plan_sha256: str | None = None) -> dict:
    """``plan_sha256``: the hash of the plan file as written. The plan is renamed into place before
    the manifest is updated, so a build or refit interrupted between the two leaves a plan that
    does not match its entry: ``checked_plan`` (and ``posterrt repo build``) refuse it."""
    return {
        "model": model, "plan": plan, "precision": precision, "profile": profile, "ranges": ranges,
        "gpu": asdict(gpu), "tensorrt_version": tensorrt_version, "source_onnx_sha256": source_onnx_sha256,
        "bundle": bundle, "build_options": build_options, "built": now(), "build_seconds": round(build_seconds, 1),
        "refits": [], "plan_sha256": plan_sha256,
    }


def get_entry(manifest: dict, model: str, folder: str | os.PathLike = "") -> dict:
    if model not in manifest.get("engines", {}):
        raise EngineError(f"engines folder {folder}: no engine for model {model!r} (it has "
                          f"{sorted(manifest.get('engines', {}))}); run `posterrt engines build --models {model}`")
    return manifest["engines"][model]


def check_engine_compatible(entry: dict, current_gpu: GpuInfo, current_trt: str,
                            source_onnx_sha256: str | None = None) -> None:
    """Refuse an engine built for another GPU, another TensorRT version, or from another ONNX.

    ``source_onnx_sha256`` is the bundle's current hash of the model's ONNX (None skips that check).
    A refit changes the engine's weights but not its graph, so the graph it was built from is what
    the bundle must still hold.
    """
    model = entry.get("model", "?")
    rebuild = f"rebuild it: posterrt engines build --models {model}"
    built_gpu = entry.get("gpu", {})
    if built_gpu.get("compute_capability") != current_gpu.compute_capability or built_gpu.get("name") != current_gpu.name:
        raise EngineError(f"engine {model!r} was built for GPU {built_gpu.get('name')!r} (compute capability "
                          f"{built_gpu.get('compute_capability')}), this GPU is {current_gpu.name!r} (compute capability "
                          f"{current_gpu.compute_capability}); TensorRT plans are tuned per GPU: {rebuild}")
    if entry.get("tensorrt_version") != current_trt:
        raise EngineError(f"engine {model!r} was built with TensorRT {entry.get('tensorrt_version')}, this is "
                          f"TensorRT {current_trt}; plans only load in the version that built them: {rebuild}")
    if source_onnx_sha256 is not None and entry.get("source_onnx_sha256") != source_onnx_sha256:
        raise EngineError(f"engine {model!r} was built from an ONNX with sha256 {str(entry.get('source_onnx_sha256'))[:12]}..., "
                          f"the bundle now holds {source_onnx_sha256[:12]}... (exported again?); {rebuild}")


def checked_plan(folder: str | os.PathLike, model: str, current_gpu: GpuInfo, current_trt: str,
                 source_onnx_sha256: str | None = None) -> Path:
    """The plan of ``model`` in an engines folder, after the compatibility checks (for the gpu-trt
    flavor of the Triton repository: call it on the serving machine before copying the plan)."""
    entry = get_entry(read_manifest(folder), model, folder)
    check_engine_compatible(entry, current_gpu, current_trt, source_onnx_sha256)
    plan = Path(folder) / entry["plan"]
    if not plan.is_file():
        raise EngineError(f"engines folder {folder}: plan {entry['plan']} of {model!r} is missing; "
                          f"rebuild it: posterrt engines build --models {model}")
    check_plan_hash(plan, entry)
    return plan


def check_plan_hash(plan: Path, entry: dict) -> None:
    """The plan file must be the one the manifest entry records (entries written before hashes
    were recorded are not checked)."""
    from posterrt.runtime.bundle import sha256_file

    expected = entry.get("plan_sha256")
    if expected and sha256_file(plan) != expected:
        model = entry.get("model", "?")
        raise EngineError(f"engine {model!r}: {plan} does not match the sha256 its manifest entry records (a build "
                          f"or refit was interrupted, or the file was replaced); rebuild it: "
                          f"posterrt engines build --models {model}")
