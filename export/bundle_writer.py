"""`posterrt export`: build each served model, export it, check parity, write the bundle atomically.

Everything is written into a staging folder beside ``--out`` and moved in only after every model
passed parity and the pipelines passed the accuracy gate (``runtime/accuracy.py``: ONNX Runtime on
the staged bundle against PyTorch), so an interrupted or failed export never leaves a file a later
load would accept.
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
from posterrt.runtime.errors import BundleError, ParityError

from .onnx_export import OPSET, export_and_check
from .registry import FAMILIES, MODEL_FAMILY, WEIGHTS_FROM, family_module, with_weight_sharers


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


#: Requests of the accuracy report an export runs: two keep `posterrt export --preset tiny` within
#: seconds (the product image posterrt ships and one synthetic product).
ACCURACY_CASES = 2


def export_bundle(preset: str, models: list[str], out: Path, sources: Sources | None = None,
                  progress: bool = True, accuracy: bool = True) -> dict:
    sources = sources or Sources()
    out = Path(out)
    models = with_weight_sharers(models)
    manifest = _read_existing(out, preset) or {
        "format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION, "preset": preset, "opset": OPSET,
        "models": {}, "config": {}, "assets": {},
    }
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        families = [f for f in FAMILIES if any(MODEL_FAMILY[m] == f for m in models)]
        for family in families:
            written = family_module(family).write_assets(preset, sources, staging)
            manifest["assets"].update(written)
            # hashed like the models: an edited tokenizer would silently change every token id
            manifest.setdefault("asset_sha256", {}).update(
                {relative: sha256_file(staging / relative) for relative in written.values() if (staging / relative).is_file()})
        bar = tqdm(models, desc="export", unit="model", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            exportable = family_module(MODEL_FAMILY[name]).build(name, preset, sources)
            owner = WEIGHTS_FROM.get(name)
            entry = export_and_check(exportable, staging, weights_file=name in WEIGHTS_FROM.values(),
                                     weights_from=staging / f"{owner}.onnx" if owner else None)
            entry["static_dims"] = exportable.static_dims
            entry["bytes"] = sum((staging / f).stat().st_size for f in [entry["file"], *entry["data_files"]])
            entry["sha256"] = sha256_file(staging / entry["file"])
            # past 2 GB the weights live in the data file: the .onnx hash alone would not cover them
            entry["data_sha256"] = {name: sha256_file(staging / name) for name in entry["data_files"]}
            manifest["models"][name] = entry
            manifest["config"][MODEL_FAMILY[name]] = exportable.config
            del exportable  # paper-size modules are large: free before the next one
        _write_tensorrt_ops_report(staging, out, manifest, models)
        manifest.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        libraries=library_versions(), export_seconds=round(time.perf_counter() - started, 1))
        _write_accuracy_report(staging, out, manifest, models, sources, accuracy, progress)
        _commit(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_tensorrt_ops_report(staging: Path, out: Path, manifest: dict, models: list[str]) -> None:
    """``staging/tensorrt_ops.json``: every exported graph against TensorRT's ONNX parser table
    (engines/onnx_operators.py); a finding does not stop the export: the CPU flavors do not care."""
    from posterrt.engines.onnx_operators import REPORT_FILE, write_bundle_report

    previous = out / REPORT_FILE
    write_bundle_report(staging, {name: manifest["models"][name]["file"] for name in models},
                        json.loads(previous.read_text()) if previous.is_file() else None)


def _write_accuracy_report(staging: Path, out: Path, manifest: dict, models: list[str], sources: Sources,
                           run: bool, progress: bool) -> None:
    """``staging/accuracy.json``: the pipelines whose models this export wrote, ONNX Runtime against
    PyTorch, judged by the fp32 gate (ParityError when it fails: nothing is committed). Entries of
    the bundle's earlier report whose models are unchanged are kept; stale ones are dropped."""
    from posterrt.runtime import accuracy

    report = _staged_accuracy_report(staging, manifest, models, sources, progress) if run else None
    previous_path = out / accuracy.REPORT_FILE
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    report = accuracy.carry_over(report, previous, {name: entry["sha256"] for name, entry in manifest["models"].items()})
    if report is None:
        return
    report["models"] = accuracy.model_errors(manifest, manifest["models"])
    failures = accuracy.apply_gate(report, accuracy.FP32_GATE)
    if failures:
        raise ParityError("accuracy gate (ONNX Runtime against PyTorch, fp32 thresholds) failed: " + "; ".join(failures))
    (staging / accuracy.REPORT_FILE).write_text(json.dumps(report, indent=2))


def _staged_accuracy_report(staging: Path, manifest: dict, models: list[str], sources: Sources,
                            progress: bool) -> dict:
    """The report over the staged bundle: a manifest listing the models staged in this run is
    written there for the runtime to read, and removed again (``_commit`` writes the real one last).
    Pipelines that need a model this run did not export are listed as skipped."""
    from posterrt.runtime.accuracy import accuracy_report
    from posterrt.runtime.backends.onnxruntime import OrtBackend
    from posterrt.runtime.bundle import Bundle

    from .torch_backend import TorchBackend

    staged_manifest = {**manifest, "models": {name: manifest["models"][name] for name in models}}
    (staging / MANIFEST).write_text(json.dumps(staged_manifest))
    try:
        bundle = Bundle(staging)
        with OrtBackend(bundle) as candidate, TorchBackend(bundle, sources) as reference:
            return accuracy_report(bundle, candidate, reference, cases=ACCURACY_CASES,
                                   candidate_name="onnxruntime", reference_name="pytorch", progress=progress)
    finally:
        (staging / MANIFEST).unlink()


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of exports into ``out`` that were killed (their process is gone): nothing
    reads them, but paper-size ones hold gigabytes."""
    for folder in out.parent.glob(f".{out.name}.staging-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
