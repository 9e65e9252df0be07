"""`posterrt export`: build each served model, export it, check parity, write the bundle atomically.

Everything is written into a staging folder beside ``--out`` and moved in only after every model
passed parity, so an interrupted or failed export never leaves a file a later load would accept.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from posterrt.runtime.bundle import BUNDLE_FORMAT, MANIFEST, sha256_file
from posterrt.runtime.contracts import CONTRACT_VERSION
from posterrt.runtime.errors import BundleError

from .onnx_export import OPSET, export_and_check
from .registry import FAMILIES, MODEL_FAMILY, family_module


@dataclass
class Sources:
    """Where weights come from: ``--checkpoint NAME=PATH`` and ``--from-pretrained COMPONENT=PATH``."""

    checkpoints: dict = field(default_factory=dict)
    pretrained: dict = field(default_factory=dict)


def library_versions() -> dict:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _read_existing(out: Path, preset: str) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("contract_version") != CONTRACT_VERSION or manifest.get("preset") != preset:
        raise BundleError(f"--out {out} holds a bundle of preset {manifest.get('preset')!r}, contract version "
                          f"{manifest.get('contract_version')}; export preset {preset!r} into another folder")
    return manifest


def export_bundle(preset: str, models: list[str], out: Path, sources: Sources | None = None,
                  progress: bool = True) -> dict:
    sources = sources or Sources()
    out = Path(out)
    manifest = _read_existing(out, preset) or {
        "format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION, "preset": preset, "opset": OPSET,
        "models": {}, "config": {}, "assets": {},
    }
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        families = [f for f in FAMILIES if any(MODEL_FAMILY[m] == f for m in models)]
        for family in families:
            manifest["assets"].update(family_module(family).write_assets(preset, sources, staging))
        bar = tqdm(models, desc="export", unit="model", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            exportable = family_module(MODEL_FAMILY[name]).build(name, preset, sources)
            entry = export_and_check(exportable, staging)
            entry["static_dims"] = exportable.static_dims
            entry["bytes"] = sum((staging / f).stat().st_size for f in [entry["file"], *entry["data_files"]])
            entry["sha256"] = sha256_file(staging / entry["file"])
            manifest["models"][name] = entry
            manifest["config"][MODEL_FAMILY[name]] = exportable.config
            del exportable  # paper-size modules are large: free before the next one
        manifest.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        libraries=library_versions(), export_seconds=round(time.perf_counter() - started, 1))
        _commit(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _commit(staging: Path, out: Path, manifest: dict) -> None:
    """Move the staged files in, then replace the manifest last: a reader sees old or new, never half."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    temporary = out / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(temporary, out / MANIFEST)
