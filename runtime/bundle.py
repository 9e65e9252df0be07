"""A bundle: the folder ``posterrt export`` writes (one ONNX per served model, tokenizers, manifest).

The runtime only reads bundles; the manifest schema lives here so that export (which writes it)
and every reader agree. Paths in a manifest are relative and confined to the bundle folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from typing import Mapping

from .contracts import CONTRACT_VERSION, ModelContract, get_contract
from .errors import BundleError, InputError
from .families import cached_step_of, cached_steps

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "posterrt-bundle"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def confined_path(root: Path, relative: str, what: str) -> Path:
    """``root / relative`` resolved, refusing absolute paths, ``..`` escapes and symlinks out of root."""
    root = Path(root).resolve()
    if os.path.isabs(relative):
        raise BundleError(f"{what}: path {relative!r} must be relative to {root}")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise BundleError(f"{what}: path {relative!r} leaves the folder {root}")
    return path


@dataclass
class ModelEntry:
    name: str
    file: str
    sha256: str
    static_dims: dict
    data_files: list  # external-data files beside the ONNX (models past 2 GB)
    data_sha256: dict = field(default_factory=dict)  # {data file: sha256}; absent in bundles before hashes


class Bundle:
    """Read-only view of an exported bundle. Hashes are checked once per model, on first use."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if self.root.is_file():
            raise BundleError(f"bundle folder {self.root} is a file; expected the folder that `posterrt export --out` "
                              f"wrote (it holds {MANIFEST})")
        if not self.root.is_dir():
            raise BundleError(f"bundle folder {self.root} does not exist; run `posterrt export --out {self.root}` first")
        if not manifest_path.is_file():
            raise BundleError(f"bundle {self.root}: no {MANIFEST}; it is not a posterrt export (or the export was interrupted)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise BundleError(f"bundle {self.root}: {MANIFEST} is not valid JSON ({error})") from None
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"bundle {self.root}: {MANIFEST} has format {self.manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        version = self.manifest.get("contract_version")
        if version != CONTRACT_VERSION:
            raise BundleError(f"bundle {self.root} was exported for contract version {version}, this posterrt "
                              f"speaks version {CONTRACT_VERSION}: export it again with this version")
        self.models: dict[str, ModelEntry] = {}
        for name, entry in self.manifest.get("models", {}).items():
            self.models[name] = ModelEntry(name, entry["file"], entry["sha256"], dict(entry.get("static_dims", {})),
                                           list(entry.get("data_files", [])), dict(entry.get("data_sha256", {})))
        self._verified: set[str] = set()

    @property
    def preset(self) -> str:
        return self.manifest.get("preset", "custom")

    @property
    def config(self) -> dict:
        """Per-family configs recorded at export (class names, scheduler settings, sizes)."""
        return self.manifest.get("config", {})

    def require(self, names) -> None:
        missing = [n for n in names if n not in self.models]
        if missing:
            raise BundleError(f"bundle {self.root} lacks models {missing}; export them with "
                              f"`posterrt export --models {','.join(missing)} --out {self.root}`")

    def contract(self, name: str) -> ModelContract:
        self.require([name])
        return get_contract(name).resolve(self.models[name].static_dims)

    def variants(self, name: str) -> dict:
        """``{variant: entry}`` of the optimized variants ``posterrt engines optimize`` wrote for a model."""
        return dict(self.manifest.get("variants", {}).get(name, {}))

    def variant_for(self, name: str, variants: Mapping[str, str]) -> str | None:
        """The variant that a ``{model: variant}`` choice (``OrtBackend(variants=...)``, ``--variants``)
        runs for model ``name``; None: the export. The one place that choice is resolved.

        A UNet's feature-cache steps (``<unet>_deep``, ``<unet>_shallow``) run their UNet's variant, so a
        request that caches never mixes an int8 plain step with fp32 cached ones; when the bundle lacks
        that variant of the step, the error names the command that builds it. They are not named
        themselves: one choice for the UNet covers its three graphs."""
        unet = cached_step_of(name)
        if unet is None:
            return variants.get(name)
        if name in variants:
            raise InputError(f"variants: {name} is a feature-cache step of {unet} and runs {unet}'s variant; "
                             f"name {unet}={variants[name]} instead")
        variant = variants.get(unet)
        if variant is not None and variant not in self.variants(name):
            raise BundleError(f"variants: {unet}={variant} also runs {unet}'s cached steps, and bundle {self.root} has "
                              f"no {variant!r} of {name}; build them with `posterrt engines optimize --bundle {self.root} "
                              f"--variant {variant} --models {','.join(cached_steps(unet))}` (or use cache_interval 1)")
        return variant

    def model_path(self, name: str, verify: bool = True, variant: str | None = None) -> Path:
        """The model's ONNX file; with ``variant`` (``fp32-opt``, ``int8``, ...) that optimized variant's.

        A variant made from another export of the model (its ``source_sha256`` differs from the
        model's hash, or its ``source_data_sha256`` from the hashes of the weights files the model
        reads: a graph whose weights are external, such as a UNet's cached steps, keeps its hash
        when only the weights change) is refused: it would silently serve the old weights."""
        self.require([name])
        entry = self.models[name]
        key = name
        if variant is not None:
            variants = self.variants(name)
            if variant not in variants:
                raise BundleError(f"bundle {self.root}: model {name!r} has no variant {variant!r} (it has "
                                  f"{sorted(variants) or 'none'}); write it with `posterrt engines optimize "
                                  f"--bundle {self.root} --variant {variant} --models {name}`")
            found = variants[variant]
            if found.get("source_sha256") != entry.sha256 or found.get("source_data_sha256", entry.data_sha256) != \
                    entry.data_sha256:
                raise BundleError(f"bundle {self.root}: variant {variant!r} of {name} was made from another export "
                                  f"of the model; run `posterrt engines optimize --variant {variant} --models {name}` again")
            entry = ModelEntry(name, found["file"], found["sha256"], entry.static_dims, list(found.get("data_files", [])),
                               dict(found.get("data_sha256", {})))
            key = f"{name}.{variant}"
        path = confined_path(self.root, entry.file, f"bundle model {key!r}")
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: model file {entry.file} is missing")
        if verify and key not in self._verified:
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise BundleError(f"bundle {self.root}: {entry.file} does not match its manifest hash "
                                  f"(the file was edited or is incomplete); export the model again")
            for data_file in entry.data_files:
                data_path = confined_path(self.root, data_file, f"bundle model {key!r}")
                if not data_path.is_file():
                    raise BundleError(f"bundle {self.root}: external data file {data_file} of {key} is missing")
                expected = entry.data_sha256.get(data_file)
                if expected and sha256_file(data_path) != expected:
                    raise BundleError(f"bundle {self.root}: {data_file} (the weights of {key}) does not match its "
                                      f"manifest hash (the file was edited or is incomplete); export the model again")
            self._verified.add(key)
        return path

    def file(self, relative: str, what: str) -> Path:
        """A bundle file other than a model (tokenizer, font), confined to the bundle, checked
        against the hash the manifest records for it (bundles before asset hashes: not checked)."""
        path = confined_path(self.root, relative, what)
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: {what} file {relative} is missing")
        expected = self.manifest.get("asset_sha256", {}).get(relative)
        if expected and f"asset:{relative}" not in self._verified and sha256_file(path) != expected:
            raise BundleError(f"bundle {self.root}: {what} file {relative} does not match its manifest hash "
                              f"(the file was edited); export the bundle again")
        self._verified.add(f"asset:{relative}")
        return path
