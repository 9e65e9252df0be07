"""Write a Triton model repository for a bundle: ``<model>/config.pbtxt`` and ``<model>/1/...``.

Flavors (``model_config.FLAVORS``):

* ``cpu``: ``backend: "python"``; ``1/`` holds ``model.onnx``, the generic ``model.py`` and
  ``contract.json``. Runs with the ``tritonserver`` of the nvidia-pytriton wheel. ``variants``
  (``--variants bg_unet=openvino-bf16``) serves a model's optimized variant from
  ``posterrt engines optimize`` instead of the export: an ONNX variant as ``model.onnx``, an
  OpenVINO IR as ``model.xml`` + ``model.bin`` (OpenVINO reads the ``.bin`` of the same stem, so
  the pair is renamed together); ``contract.json``, the config's parameters and the report name it.
* ``gpu-onnx``: ``platform: "onnxruntime_onnx"``; ``1/model.onnx`` (plus external data), TensorRT
  or CUDA execution accelerator.
* ``gpu-trt``: ``platform: "tensorrt_plan"``; ``1/model.plan`` taken from ``--engines``.

Server stages (cpu flavor, written with the whole bundle, ``ServingOptions.server_loops``; one
folder per spec of ``runtime/server_stages``, all alike): ``<stage>/1/`` holds the stage's stub
(``runtime/triton/stubs/<stub>.py``) as ``model.py``, ``stage.json`` (its settings and the variants
it runs) and ``bundle/``: the manifest, the assets and hardlinks to the files of the models it runs
in-process. The config records the stage's identity (``posterrt_stage_sha256``), which a client
compares with its own bundle's before using the stage. ``<stage>_stream/`` is the same stage as a
decoupled model (``model_transaction_policy { decoupled: true }``) that streams progress to gRPC
clients; HTTP clients use ``<stage>/``.

The client side does not live here: a client is handed the bundle folder itself (manifest and
tokenizers; the ONNX files are not needed to talk to Triton), see ``write_client_bundle``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from ..backends.openvino import is_openvino_ir
from ..bundle import MANIFEST, Bundle, confined_path, sha256_file
from ..contracts import CONTRACT_VERSION, ModelContract, dim_range, is_dynamic
from ..errors import BundleError, InputError
from ..server_stages import BUNDLE_FOLDER as STAGE_BUNDLE_FOLDER, SERVER_STAGES, SETTINGS_FILE as STAGE_SETTINGS_FILE
from ..server_stages import ServerStage
from .model_config import (CONTRACT_VERSION_PARAMETER, ONNX_SHA256_PARAMETER, STAGE_SHA256_PARAMETER,
                           STAGE_VARIANTS_PARAMETER, ServingOptions, build_model_config, contract_max_request_bytes,
                           to_pbtxt)

MODEL_TEMPLATE = Path(__file__).with_name("model.py")
#: the server stages' stubs: ``<stub>.py`` is copied as the stage's model.py
STUBS = Path(__file__).with_name("stubs")
#: Above this a stage calls its served model through BLS by default rather than holding a second
#: copy of its weights: the tiny UNets are a few MB, the paper ones 3.4 GB (bg_unet) and 4.9 GB
#: (render_unet), which twice over would not fit beside the other models in 24 GB.
IN_PROCESS_LIMIT_BYTES = 1 << 30
CONTRACT_FILE = "contract.json"
VERSION = "1"
ENGINES_MANIFEST = "manifest.json"  # written by `posterrt engines build` beside the plans
ONNX_FILE = "model.onnx"
#: An OpenVINO IR variant: model.py (which has its own copy of these names: it cannot import
#: posterrt) runs it with OpenVINO when the version folder holds IR_FILE.
IR_FILE, IR_WEIGHTS = "model.xml", "model.bin"
#: Config parameters naming the variant a model serves (absent: the exported fp32 ONNX). The
#: ``posterrt_onnx_sha256`` parameter stays the export's hash: the variant was made from it
#: (Bundle.model_path refuses a stale one), so a client holding the bundle still matches.
VARIANT_PARAMETER = "posterrt_variant"
VARIANT_SHA256_PARAMETER = "posterrt_variant_sha256"


@dataclass
class ModelReport:
    name: str
    folder: Path
    ready: bool  # False when a gpu-trt plan is missing
    note: str = ""
    variant: dict | None = None  # the optimized variant served instead of the export (variant_record)


@dataclass
class RepositoryReport:
    root: Path
    flavor: str
    models: list[ModelReport] = field(default_factory=list)
    #: serving-only models that drive a bundle model in the server (``plannet_sampler``, ``bg_unet_sampler``, ...)
    server_loops: list[ModelReport] = field(default_factory=list)
    #: what the build decided on the user's behalf (a server loop left out, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def missing_plans(self) -> list[str]:
        return [m.name for m in self.models if not m.ready]


def contract_document(contract: ModelContract, static_dims: dict, max_request_bytes: int | None = None) -> dict:
    """The resolved contract as JSON for the generic model.py (numpy-only validation fallback), with
    the request size limit it enforces (default: the largest request the contract allows)."""
    def tensor(spec):
        return {"name": spec.name, "dtype": spec.dtype, "low": spec.low, "high": spec.high,
                "shape": [symbol if is_dynamic(symbol) else int(symbol) for symbol in spec.shape]}

    ranges = {}
    for spec in contract.inputs + contract.outputs:
        for symbol in spec.shape:
            rng = dim_range(symbol)
            if rng is not None:
                ranges[symbol] = [rng.min, rng.max, rng.multiple_of]
    return {"model": contract.name, "contract_version": CONTRACT_VERSION, "static_dims": dict(static_dims),
            "inputs": [tensor(s) for s in contract.inputs], "outputs": [tensor(s) for s in contract.outputs],
            "ranges": ranges,
            "max_request_bytes": int(max_request_bytes or contract_max_request_bytes(contract))}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hardlink (no extra disk for paper-size weights); copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def find_plan(engines: Path, model: str) -> Path | None:
    """The engine of ``model`` in an engines folder: ``<model>.plan`` (or ``<model>/model.plan``)."""
    for candidate in (engines / f"{model}.plan", engines / model / "model.plan"):
        if candidate.is_file():
            return candidate
    return None


def engine_record(engines: Path, model: str) -> dict:
    """The entry ``posterrt engines build`` recorded for ``model`` in ``<engines>/manifest.json``
    (empty for a plan made some other way). Read as data: the runtime does not import engines."""
    path = engines / ENGINES_MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise BundleError(f"--engines: {path} is not valid JSON ({error})") from None
    return manifest.get("engines", {}).get(model, {}) if isinstance(manifest, dict) else {}


def variant_record(bundle: Bundle, model: str, variant: str) -> dict:
    """What the repository records about a served variant: its name and files as the bundle
    manifest lists them, their hashes, the hash of the export it was made from, the engine."""
    entry = bundle.variants(model)[variant]
    return {"name": variant, "file": entry["file"], "sha256": entry["sha256"],
            "data_sha256": dict(entry.get("data_sha256", {})), "source_sha256": entry["source_sha256"],
            "engine": "openvino" if is_openvino_ir(entry["file"]) else "onnxruntime"}


def _variant_parameters(served: dict | None) -> dict:
    return {VARIANT_PARAMETER: served["name"], VARIANT_SHA256_PARAMETER: served["sha256"]} if served else {}


def _link_model_files(bundle: Bundle, name: str, variant: str | None, version: Path, served_as: str = ONNX_FILE) -> None:
    """Link the export (or ``variant``) of ``name`` into ``version``, through ``Bundle.model_path``
    so the manifest hashes (and a variant's source) are checked before anything is served.

    An ONNX file refers to its external data by the data file's name: those keep their names. An
    IR's ``.xml`` names no weights file: OpenVINO reads the ``.bin`` with the same stem, so it is
    renamed with the ``.xml`` (checked with OpenVINO 2026.4's reader)."""
    path = bundle.model_path(name, variant=variant)
    if variant is None:
        data_files = bundle.models[name].data_files
    else:
        data_files = bundle.variants(name)[variant].get("data_files", [])
    ir = is_openvino_ir(path)
    _link_or_copy(path, version / (IR_FILE if ir else served_as))
    for data_file in data_files:
        source = confined_path(bundle.root, data_file, f"bundle model {name!r}")
        weights = ir and source.name == path.with_suffix(".bin").name
        _link_or_copy(source, version / (IR_WEIGHTS if weights else source.name))


def _write_model(bundle: Bundle, name: str, folder: Path, options: ServingOptions, engines: Path | None,
                 variant: str | None = None) -> ModelReport:
    entry = bundle.models[name]
    contract = bundle.contract(name)
    parameters = {ONNX_SHA256_PARAMETER: entry.sha256, CONTRACT_VERSION_PARAMETER: CONTRACT_VERSION}
    served = variant_record(bundle, name, variant) if variant else None
    parameters.update(_variant_parameters(served))
    record = engine_record(engines, name) if options.flavor == "gpu-trt" and engines else {}
    # a plan only accepts the batch sizes of its profile; Triton refuses a config that promises more
    engine_batch = record.get("ranges", {}).get(contract.batch_dim, {}).get("max")
    config = build_model_config(contract, options, parameters, max_batch=engine_batch)
    version = folder / VERSION
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config))
    if options.flavor in ("cpu", "gpu-onnx"):
        _link_model_files(bundle, name, variant, version)
        if options.flavor == "cpu":
            shutil.copyfile(MODEL_TEMPLATE, version / "model.py")
            document = contract_document(contract, entry.static_dims, options.max_request_bytes)
            ir = served is not None and served["engine"] == "openvino"
            document.update(model_file=IR_FILE if ir else ONNX_FILE, variant=served)
            (version / CONTRACT_FILE).write_text(json.dumps(document, indent=2))
        return ModelReport(name, folder, True, variant=served)
    if record.get("plan"):  # the engines manifest names the file; otherwise look for the usual names
        plan = confined_path(engines, record["plan"], f"engine of {name!r}")
        plan = plan if plan.is_file() else None
    else:
        plan = find_plan(engines, name) if engines else None
    source = record.get("source_onnx_sha256")
    if plan is not None and source and source != entry.sha256:
        return ModelReport(name, folder, False, f"the plan {plan} was built from another export of {name} "
                                                f"(ONNX {source[:12]}..., bundle {entry.sha256[:12]}...); build it again "
                                                f"with `posterrt engines build --bundle {bundle.root}`")
    if plan is not None and record.get("plan_sha256") and sha256_file(plan) != record["plan_sha256"]:
        # renamed into place before its manifest entry was written: an interrupted build or refit
        return ModelReport(name, folder, False, f"the plan {plan} does not match the sha256 its engines manifest "
                                                f"records (an interrupted build or refit?); build it again with "
                                                f"`posterrt engines build --models {name}`")
    if plan is None:
        where = f"in {engines}" if engines else "(no --engines folder given)"
        final = folder.parent / name / version.relative_to(folder) / "model.plan"  # ``folder`` is a staging copy
        return ModelReport(name, folder, False, f"no TensorRT plan for {name} {where}; build it with "
                                                f"`posterrt engines build` and copy it to {final}"
                                                f"{'' if engines else ' (or pass --engines FOLDER)'}")
    _link_or_copy(plan, version / "model.plan")
    return ModelReport(name, folder, True)


def _stage_options(options: ServingOptions, stage: ServerStage, name: str, costly: ModelContract) -> ServingOptions:
    """Serving options for server stage model ``name`` (the stage or its streamed model). A stage that
    batches requests is served as any model; for the others one request is one whole loop (nothing
    to batch), and its cost is ``costly``'s calls, so its threads and instances follow that model's
    unless given for the stage (or the streamed model) itself."""
    if stage.batches_requests:
        return options
    threads, instances = options.model_threads, options.model_instances
    thread_count = threads.get(name, threads.get(stage.name, threads.get(costly.name, options.intra_op_threads)))
    instance_count = instances.get(name, instances.get(stage.name, options.instance_count(costly)))
    return replace(options, dynamic_batching=False, model_threads={**threads, name: thread_count},
                   model_instances={**instances, name: instance_count})


def _model_call(bundle: Bundle, stage: ServerStage, options: ServingOptions) -> str:
    """How the stub calls its driven model: as the options say, else in-process unless the model's
    files are over :data:`IN_PROCESS_LIMIT_BYTES`."""
    if stage.model_call is None:
        return "in-process"
    entry = bundle.models[stage.models[0]]
    size = sum((bundle.root / name).stat().st_size for name in [entry.file, *entry.data_files])
    return options.extra_parameters.get(stage.model_call, "in-process" if size <= IN_PROCESS_LIMIT_BYTES else "bls")


def _write_stage(bundle: Bundle, stage: ServerStage, folder: Path, options: ServingOptions,
                 variants: Mapping[str, str], stream: bool = False) -> ModelReport:
    """``<stage>/`` (``stream``: ``<stage>_stream/``, the decoupled model that streams progress): its
    config, its stub as ``model.py``, ``stage.json`` (its settings and the variants it runs) and a
    small bundle (manifest, assets, links to the files of the models it runs in-process, or to the
    variants served for them)."""
    contract = stage.stream_contract(bundle) if stream else stage.contract(bundle)
    served = {model: variants[model] for model in stage.models if model in variants}
    call = _model_call(bundle, stage, options)
    parameters = {CONTRACT_VERSION_PARAMETER: CONTRACT_VERSION, STAGE_SHA256_PARAMETER: stage.identity(bundle),
                  STAGE_VARIANTS_PARAMETER: json.dumps(served, sort_keys=True)}
    if stage.model_call:
        parameters[stage.model_call] = call
    config = build_model_config(contract, _stage_options(options, stage, contract.name, bundle.contract(stage.costly_model)),
                                parameters)
    if stream:
        config.model_transaction_policy.decoupled = True
    version = folder / VERSION
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config))
    shutil.copyfile(STUBS / f"{stage.stub}.py", version / "model.py")
    document = {"stage": stage.name, "settings": stage.settings(bundle), "variants": served}
    (version / STAGE_SETTINGS_FILE).write_text(json.dumps(document, indent=2))
    small = write_client_bundle(bundle, version / STAGE_BUNDLE_FOLDER)
    linked = set()  # a weights file two graphs share (a UNet's cached steps) is linked once
    for model in stage.present_models(bundle) if call == "in-process" else ():
        entry = bundle.models[model]
        files = [entry.file, *entry.data_files]
        variant = bundle.variant_for(model, served)  # a UNet's variant brings its cached steps
        if variant is not None:
            record = bundle.variants(model)[variant]
            files += [record["file"], *record.get("data_files", [])]
        for relative in (f for f in files if f not in linked):
            linked.add(relative)
            target = confined_path(small, relative, f"{stage.name} file of {model!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(confined_path(bundle.root, relative, f"bundle model {model!r}"), target)
    notes = [f"{', '.join(stage.models)} called {call}"] if stage.model_call else []
    notes += [f"variants {served}"] if served else []
    return ModelReport(contract.name, folder, True, note="; ".join(notes),
                       variant=variant_record(bundle, stage.models[0], served[stage.models[0]])
                       if len(stage.models) == 1 and served else None)


def stage_models() -> dict[str, tuple[str, ...]]:
    """Server stage -> the bundle models it drives."""
    return {name: stage.models for name, stage in SERVER_STAGES.items()}


def served_models(bundle: Bundle, options: ServingOptions, models: list[str] | None = None) -> dict[str, bool]:
    """``{bundle model: ONNX only}`` for a build of ``models``: the models it writes and those its
    server stages drive; True where a stage that runs ONNX Runtime only drives the model (an
    OpenVINO variant of it would cost that stage)."""
    loops = server_stages_for(bundle, options, models)
    served = {m: False for m in (bundle.models if models is None else models) if m not in loops}
    for loop in loops:
        for model in SERVER_STAGES[loop].models:
            served[model] = served.get(model, False) or SERVER_STAGES[loop].onnx_only
    return served


def server_stages_for(bundle: Bundle, options: ServingOptions, models: list[str] | None) -> list[str]:
    """The server stages to write: on the cpu flavor, when the whole bundle is served (or a stage
    is named in ``models``) and the bundle has the models and settings the stage runs."""
    stages = []
    for name, stage in SERVER_STAGES.items():
        wanted = (models is None and options.server_loops) or (models is not None and name in models)
        if not wanted or not stage.available(bundle):
            continue
        if options.flavor != "cpu":
            if models is not None:
                raise InputError(f"--models: {name} runs {', '.join(stage.models)} in a Python-backend model: cpu flavor "
                                 f"only, got --flavor {options.flavor}")
            continue
        stages.append(name)
    return stages


def _swap_in(root: Path, name: str, write) -> ModelReport:
    """Stage ``write(staging_folder)`` beside ``root/name``, then swap it in whole."""
    final = root / name
    staging = root / f".{name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = write(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.folder = final
    return report


def build_repository(bundle: Bundle | str | os.PathLike, out: str | os.PathLike, options: ServingOptions | None = None,
                     models: list[str] | None = None, engines: str | os.PathLike | None = None,
                     variants: Mapping[str, str] | None = None) -> RepositoryReport:
    """Write (or replace) the folders of ``models`` (default: every model of the bundle) under ``out``.

    ``variants`` (``{model: variant}``, cpu flavor): serve those optimized variants of the bundle
    instead of the exported files; all are checked (known, made from this export) before anything
    is written. Each model is staged beside its final folder and swapped in whole, so a server
    polling the repository never sees half a model. Other folders under ``out`` are left alone.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    options = options or ServingOptions()
    loops = server_stages_for(bundle, options, models)
    names = list(bundle.models) if models is None else [m for m in models if m not in loops]
    if not names and not loops:
        raise BundleError(f"bundle {bundle.root} has no models to serve")
    bundle.require(names)
    variants = dict(variants or {})
    _check_variants(bundle, options, list(served_models(bundle, options, models)), variants)
    notes = []
    for name in list(loops):
        stage = SERVER_STAGES[name]
        ir = [model for model in stage.models if _is_openvino(bundle, model, bundle.variant_for(model, variants))]
        if stage.onnx_only and ir:
            # the stub runs its model with ONNX Runtime: it follows an ONNX variant, not an OpenVINO
            # IR; without the stage, clients call the served model once per step
            reason = f"{name} runs {ir[0]} with ONNX Runtime, not its OpenVINO variant {variants[ir[0]]!r}"
            if models is not None:
                raise InputError(f"--variants: {reason}; leave {name} out of --models")
            notes.append(f"{name} not written: {reason}; clients call the served {ir[0]} once per step")
            loops.remove(name)
    engines = Path(engines) if engines else None
    if engines is not None and not engines.is_dir():
        raise InputError(f"--engines: folder {engines} does not exist; build engines with `posterrt engines build`")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    report = RepositoryReport(root, options.flavor, notes=notes)
    for name in names:
        report.models.append(_swap_in(root, name, lambda staging: _write_model(
            bundle, name, staging, options, engines, bundle.variant_for(name, variants))))
    for name in loops:
        stage = SERVER_STAGES[name]
        for stream in (False, True):
            report.server_loops.append(_swap_in(root, stage.stream_name if stream else name, lambda staging: _write_stage(
                bundle, stage, staging, options, variants, stream)))
    return report


def _check_variants(bundle: Bundle, options: ServingOptions, served: list[str], variants: dict[str, str]) -> None:
    """Refuse variants that cannot be served as asked, before anything is written."""
    if not variants:
        return
    if options.flavor != "cpu":
        raise InputError(f"--variants: optimized variants are served by the cpu flavor only (ONNX Runtime or "
                         f"OpenVINO in the Python backend), got --flavor {options.flavor}")
    not_built = [model for model in variants if model not in served]
    if not_built:
        raise InputError(f"--variants: {not_built} are not among the models this build writes "
                         f"({', '.join(served)}); add them to --models")
    for model in variants:  # unknown or stale variants fail here
        bundle.model_path(model, verify=False, variant=bundle.variant_for(model, variants))


def _is_openvino(bundle: Bundle, model: str, variant: str | None) -> bool:
    return variant is not None and is_openvino_ir(bundle.variants(model)[variant]["file"])


def write_client_bundle(bundle: Bundle | str | os.PathLike, out: str | os.PathLike) -> Path:
    """What a client of Triton needs from a bundle: the manifest and its assets (tokenizers, ...).

    ``Bundle`` reads such a folder like a full bundle; only ``Bundle.model_path`` (the in-process
    ONNX Runtime backend) needs the ONNX files, which stay on the server.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for key, relative in bundle.manifest.get("assets", {}).items():
        source = confined_path(bundle.root, relative, f"bundle asset {key!r}")
        target = confined_path(out, relative, f"client bundle asset {key!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, target)
        else:
            raise BundleError(f"bundle {bundle.root}: asset {key!r} ({relative}) is missing")
    shutil.copy2(bundle.root / MANIFEST, out / MANIFEST)
    return out
