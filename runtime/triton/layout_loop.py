"""RADM's whole layout stage run inside Triton: the Python-backend model ``radm_layout``.

Why: the client-side stage makes two round trips (the backbone beside the text encoder, then the
head) and carries the backbone's FPN features to the client and back into the head's request. On
the tiny bundle each Python-backend call costs 2-4 ms over gRPC against 1-2 ms of compute for the
encoders (benchmarks/RESULTS.md, Serving), which put the layout pipeline 15-20% above in-process.
With the stage in the server a layout costs one request: image and token ids in, boxes out.

How: the stub runs posterrt's own ``RADMLayout.detect`` (the client's code, not a copy) over an
in-process ONNX Runtime backend of a small bundle in its version folder: the manifest and assets
of the exported bundle (``write_client_bundle``) plus links to the three RADM files, so the stub
checks their hashes as the embedded backend does. The generator is ``stage_rng(seed, "layout")``
on both sides, so a seed gives the same boxes wherever the stage runs.

Inputs, one layout per row (rows run one after another): ``image`` (uint8 HxWx3, as the pipeline has it), the
texts' ``input_ids`` / ``attention_mask`` padded to ``lines`` rows and ``text_lines`` (how many of
them are real: 0 = no texts), ``seed`` and ``steps`` (0: the bundle's ``sampling_steps``).
Outputs: ``boxes``, ``scores``, ``labels``, padded to the most detections of a row (at least one
row), and ``count``, each row's real number.

The client half (``find_radm_layout``) uses the stage only on servers whose ``radm_layout`` was
built from the same export (ONNX hashes) with the same RADM settings, as for the other loops.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from posterrt.runtime.contracts import PROLOGUE, ModelContract, TensorSpec, dim_range, get_contract
from posterrt.runtime.families import FAMILIES
from posterrt.runtime.schedulers.radm import Detections
from posterrt.runtime.triton.sampling_loop import (RequestError, answer_each, infer_first, is_triton_backend,
                                                   serves_model)

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: the client half, or unit tests
    pb_utils = None

MODEL_NAME = "radm_layout"
FAMILY = FAMILIES["radm"].config_key
#: the bundle models the stage runs
MODELS = FAMILIES["radm"].models
#: the small bundle beside model.py (manifest, assets, links to the three models' files)
BUNDLE_FOLDER = "bundle"
SETTINGS_SHA256_PARAMETER = "posterrt_layout_sha256"
#: config parameter: {model: variant} of the RADM models the stage runs as variants (JSON)
VARIANTS_PARAMETER = "posterrt_layout_variants"
MAX_SEED = 2 ** 63 - 1


def layout_contract(static_dims: dict[str, dict]) -> ModelContract:
    """The stage's contract; ``static_dims``: each RADM model's static sizes from the bundle."""
    text = get_contract("radm_text_encoder").resolve(static_dims["radm_text_encoder"])
    ids, attention = text.input("input_ids"), text.input("attention_mask")
    lines = ("batch", "lines", "text_tokens")
    return ModelContract(
        MODEL_NAME, "layout", PROLOGUE,
        inputs=(
            # the pixels as the pipeline has them: a quarter of the backbone's float32 input on the wire
            TensorSpec("image", "uint8", ("batch", "height", "width", 3), "RGB 0..255, H and W multiples of 64"),
            TensorSpec("input_ids", ids.dtype, lines, "token ids of each text line (padding rows past text_lines)",
                       ids.low, ids.high),
            TensorSpec("attention_mask", attention.dtype, lines, "1 for tokens, 0 for padding", attention.low,
                       attention.high),
            TensorSpec("text_lines", "int64", ("batch",), "real text lines (0: none)", 0, 21),
            TensorSpec("seed", "int64", ("batch",), "the request's seed", 0, None),
            TensorSpec("steps", "int64", ("batch",), "box sampling steps (0: the bundle's sampling_steps)", 0, 1001),
        ),
        outputs=(
            TensorSpec("boxes", "float32", ("batch", "detections", 4), "pixel x1y1x2y2, best first"),
            TensorSpec("scores", "float32", ("batch", "detections"), "class score of each box"),
            TensorSpec("labels", "int64", ("batch", "detections"), "class index of each box"),
            TensorSpec("count", "int64", ("batch",), "real detections of the row (the rest is padding)"),
        ),
        doc="RADM's layout stage in the server (backbone, text encoder, box sampling loop, NMS): one request per layout.",
    )


def settings_sha256(bundle) -> str:
    """What a client's bundle must share with the server's for the stage to give its boxes: the
    three models' exported weights and the RADM settings (classes, sampler, thresholds)."""
    identity = {"models": {model: bundle.models[model].sha256 for model in MODELS},
                "config": bundle.config.get(FAMILY, {})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def static_dims(bundle) -> dict[str, dict]:
    return {model: bundle.models[model].static_dims for model in MODELS}


# -- the server half -------------------------------------------------------------------------
def detect_row(layout, inputs: dict, row: int) -> Detections:
    """One row's layout with ``layout`` (a ``RADMLayout`` over the stub's in-process backend)."""
    lines = int(inputs["text_lines"][row])
    if lines > inputs["input_ids"].shape[1]:
        raise RequestError(f"model {MODEL_NAME!r} input 'text_lines': {lines} lines, but input_ids holds "
                           f"{inputs['input_ids'].shape[1]} rows")
    ids = inputs["input_ids"][row, :lines] if lines else None
    attention = inputs["attention_mask"][row, :lines] if lines else None
    steps = int(inputs["steps"][row]) or None
    return layout.detect(inputs["image"][row], ids, attention, int(inputs["seed"][row]), steps)


def pad_detections(rows: list[Detections]) -> dict[str, np.ndarray]:
    """The rows' detections as the output tensors: padded to the longest (at least one), with counts."""
    width = max(1, *(len(d) for d in rows))
    boxes = np.zeros((len(rows), width, 4), np.float32)
    scores = np.zeros((len(rows), width), np.float32)
    labels = np.zeros((len(rows), width), np.int64)
    for row, found in enumerate(rows):
        boxes[row, :len(found)], scores[row, :len(found)], labels[row, :len(found)] = found.boxes, found.scores, found.labels
    return {"boxes": boxes, "scores": scores, "labels": labels,
            "count": np.array([len(d) for d in rows], dtype=np.int64)}


class TritonPythonModel:
    def initialize(self, args):
        from posterrt.runtime.backends.onnxruntime import OrtBackend
        from posterrt.runtime.bundle import Bundle
        from posterrt.runtime.pipelines.layout import RADMLayout
        from posterrt.runtime.triton.model import config_parameters

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        parameters = config_parameters(config)
        bundle = Bundle(folder / BUNDLE_FOLDER)
        variants = json.loads(parameters.get(VARIANTS_PARAMETER, "{}"))
        backend = OrtBackend(bundle, intra_op_threads=int(parameters.get("intra_op_thread_count", 1)),
                             inter_op_threads=int(parameters.get("inter_op_thread_count", 1)), variants=variants)
        # the served models' policy (model.session_options): an idle spinning thread burns a core
        backend.options_template.add_session_config_entry("session.intra_op.allow_spinning",
                                                          parameters.get("allow_spinning", "0"))
        backend.load(MODELS)  # hashes checked and sessions built now, not on the first request
        self.layout = RADMLayout(backend, progress=False, server_layout=False)
        self.contract = layout_contract(static_dims(bundle))

    def execute(self, requests):  # no dynamic batching: each request's rows run one after another
        return answer_each(pb_utils, requests, self.contract, lambda inputs: pad_detections(
            [detect_row(self.layout, inputs, row) for row in range(len(inputs["seed"]))]))

    def finalize(self):
        self.layout = None


# -- the client half -------------------------------------------------------------------------
class RadmServerLayout:
    """``radm_layout`` on the servers of a ``TritonBackend`` that serve it for this bundle.
    ``detect(...)`` takes ``RADMLayout.detect``'s arguments and returns its detections."""

    def __init__(self, backend, servers: list):
        self.backend = backend
        self.servers = servers
        self.contract = layout_contract(static_dims(backend.bundle))

    def detect(self, image: np.ndarray, ids: np.ndarray | None, attention: np.ndarray | None, seed: int,
               steps: int | None = None) -> Detections:
        if ids is None:  # one padding row of the shortest length: Triton tensors have no empty axes
            ids = attention = np.zeros((1, dim_range("text_tokens").min), dtype=np.int64)
            lines = 0
        else:
            lines = len(ids)
        one = lambda value: np.array([value], dtype=np.int64)  # noqa: E731
        inputs = {"image": image[None], "input_ids": ids[None], "attention_mask": attention[None], "text_lines": one(lines),
                  "seed": one(seed), "steps": one(0 if steps is None else steps)}
        outputs = infer_first(self.backend, self.servers, self.contract, inputs)
        count = int(outputs["count"][0])
        return Detections(outputs["boxes"][0, :count], outputs["scores"][0, :count], outputs["labels"][0, :count])


def find_radm_layout(backend) -> RadmServerLayout | None:
    """The server-side layout stage when ``backend`` offers it, else None (the stage runs here).

    A ``TritonBackend`` offers it through the servers whose ``radm_layout`` was built from this
    bundle's RADM models and settings. A wrapper of a backend (the benchmark's timer) answers
    through its own ``radm_layout()`` method."""
    own = getattr(backend, "radm_layout", None)
    if callable(own):
        return own()
    if not is_triton_backend(backend) or any(m not in backend.bundle.models for m in MODELS) \
            or FAMILY not in backend.bundle.config:
        return None
    expected = {SETTINGS_SHA256_PARAMETER: settings_sha256(backend.bundle)}
    servers = [server for server in backend.servers if serves_model(server, MODEL_NAME, expected)]
    return RadmServerLayout(backend, servers) if servers else None
