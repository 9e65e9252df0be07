"""Server stages: the parts of a pipeline that can run inside a Triton server, one spec each.

A stage replaces a loop of the pipeline (PlanNet's sampler, a UNet's denoising loop, RADM's whole
layout stage) by one request to a Python-backend model. Its spec says what both sides need, and
nothing of either side's machinery:

* ``name``: the served model; ``family``: whose settings it runs with; ``models``: the bundle
  models it drives; ``optional_models``: those it drives when the bundle has them (a UNet's
  feature-cache steps);
* ``contract(bundle)``: its request and response tensors at this bundle's sizes;
* ``settings(bundle)``: what it needs of the bundle's config. Written beside the stub; its hash,
  with the driven models' hashes (``identity``), tells a client whether a server's stage gives
  this bundle's results;
* ``encode(*args)``: the pipeline's arguments -> the request tensors and the function that turns
  the response into the pipeline's result (the same value the pipeline's own loop returns);
* ``stub``: the module under ``runtime/triton/stubs/`` that serves it (copied as ``model.py``);
* ``model_call``: the config parameter choosing how the stub calls the driven model
  (``in-process``: its own copy of the file; ``bls``: the served model, once per step), None when
  it always runs its models in-process; ``batches_requests``: requests Triton batches run as one
  loop; ``onnx_only``: the stub runs ONNX Runtime only (an OpenVINO variant cannot be followed).

Users: ``posterrt repo build`` writes one folder per spec (``runtime/triton/repository.py``); the
Triton backend answers ``server_stage(name)`` with a client for it
(``runtime/backends/triton_stages.py``); a pipeline asks its backend and loops itself on None.
Adding a stage: docs/design.md, "Adding a server stage".
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from dataclasses import replace

from ..contracts import CONTRACT_VERSION, ModelContract, TensorSpec
from ..families import FAMILIES, unet_families
from . import plannet, radm_layout, unet

#: the file beside the stub with {"stage", "settings", "variants"} (what ``settings`` returned)
SETTINGS_FILE = "stage.json"
#: the small bundle beside the stub: manifest, assets, links to the files it runs in-process
BUNDLE_FOLDER = "bundle"
#: each stage is also served as ``<name>_stream``: a decoupled model that streams progress (gRPC only:
#: Triton's HTTP endpoint refuses decoupled models, so HTTP clients get the plain one, no progress)
STREAM_SUFFIX = "_stream"
#: the streamed model's progress responses carry only this output
PROGRESS = TensorSpec("progress", "int64", ("batch", 2), "[steps done, steps] of the stage's loop (progress responses only)")


@dataclass(frozen=True)
class ServerStage:
    name: str
    family: str
    models: tuple[str, ...]
    contract: Callable  # (bundle) -> ModelContract
    settings: Callable  # (bundle) -> dict (JSON)
    encode: Callable  # (stage contract, *pipeline arguments) -> (inputs, decode(outputs) -> result)
    stub: str
    model_call: str | None = None
    batches_requests: bool = False
    onnx_only: bool = False
    optional_models: tuple[str, ...] = ()

    def present_models(self, bundle) -> tuple[str, ...]:
        """The models it drives with ``bundle``: its own, and the optional ones the bundle has."""
        return self.models + tuple(m for m in self.optional_models if m in bundle.models)

    @property
    def stream_name(self) -> str:
        return self.name + STREAM_SUFFIX

    def stream_contract(self, bundle) -> ModelContract:
        """The streamed model's contract: the stage's, plus the progress output."""
        contract = self.contract(bundle)
        return replace(contract, name=self.stream_name, outputs=(*contract.outputs, PROGRESS))

    @property
    def progress_stage(self) -> str:
        """The pipeline stage its progress events name (runtime/families.py)."""
        return FAMILIES[self.family].stage

    @property
    def costly_model(self) -> str:
        """The model whose calls are the stage's cost (its threads and instances follow it)."""
        return FAMILIES[self.family].denoiser

    def available(self, bundle) -> bool:
        """Whether ``bundle`` has what the stage runs: its models and its family's settings."""
        return all(m in bundle.models for m in self.models) and FAMILIES[self.family].config_key in bundle.config

    def identity(self, bundle) -> str:
        """What a server's stage and a client's bundle must share for the stage to give the client's
        results: the driven models' exported weights and sizes, and the stage's settings."""
        document = {"stage": self.name, "contract_version": CONTRACT_VERSION, "settings": self.settings(bundle),
                    "models": {m: [bundle.models[m].sha256, bundle.models[m].static_dims] for m in self.present_models(bundle)}}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _stages() -> dict[str, ServerStage]:
    stages = [ServerStage(plannet.NAME, "plannet", (plannet.DENOISER,), plannet.contract, plannet.settings,
                          plannet.encode, stub="plannet_sampler", model_call=plannet.MODEL_CALL_PARAMETER, batches_requests=True,
                          onnx_only=True)]
    for model, family in unet_families().items():
        stages.append(ServerStage(unet.stage_name(model), family.name, (model,), unet.contract_for(model),
                                  unet.settings_for(family), unet.encode, stub="unet_sampler", model_call=unet.MODEL_CALL_PARAMETER,
                                  optional_models=family.cached_steps))
    stages.append(ServerStage(radm_layout.NAME, "radm", FAMILIES["radm"].models, radm_layout.contract,
                              radm_layout.settings, radm_layout.encode, stub="radm_layout"))
    return {stage.name: stage for stage in stages}


#: every server stage by name, in the order a repository writes them
SERVER_STAGES: dict[str, ServerStage] = _stages()
