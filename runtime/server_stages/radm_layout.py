"""``radm_layout``: RADM's whole layout stage in the server (backbone, text encoder, box sampling
loop, NMS), one request per layout.

Why: the client-side stage makes two round trips (the backbone beside the text encoder, then the
head) and carries the backbone's FPN features to the client and back into the head's request;
over gRPC that put the layout pipeline 15-20% above in-process (benchmarks/RESULTS.md, Serving).

Inputs, one layout per row (rows run one after another): ``image`` (uint8 HxWx3, as the pipeline
has it), the texts' ``input_ids`` / ``attention_mask`` padded to ``lines`` rows and
``text_lines`` (how many are real: 0 = no texts), ``seed`` and ``steps`` (0: the bundle's
``sampling_steps``). Outputs: ``boxes``, ``scores``, ``labels``, padded to the most detections of
a row (at least one row), and ``count``, each row's real number. The generator is
``stage_rng(seed, "layout")`` on both sides, so a seed gives the same boxes wherever it runs.
"""
from __future__ import annotations

import numpy as np

from ..contracts import PROLOGUE, ModelContract, TensorSpec, dim_range, get_contract
from ..schedulers.radm import Detections

NAME = "radm_layout"


def contract(bundle) -> ModelContract:
    text = get_contract("radm_text_encoder").resolve(bundle.models["radm_text_encoder"].static_dims)
    ids, attention = text.input("input_ids"), text.input("attention_mask")
    lines = ("batch", "lines", "text_tokens")
    return ModelContract(
        NAME, "layout", PROLOGUE,
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


def settings(bundle) -> dict:
    return {"config": bundle.config["radm"]}


def encode(contract: ModelContract, image: np.ndarray, ids: np.ndarray | None, attention: np.ndarray | None, seed: int,
           steps: int | None = None):
    """``RADMLayout.detect``'s arguments -> the request, and the decoding of its answer (the detections)."""
    if ids is None:  # one padding row of the shortest length: Triton tensors have no empty axes
        ids = attention = np.zeros((1, dim_range("text_tokens").min), dtype=np.int64)
        lines = 0
    else:
        lines = len(ids)
    one = lambda value: np.array([value], dtype=np.int64)  # noqa: E731
    inputs = {"image": image[None], "input_ids": ids[None], "attention_mask": attention[None], "text_lines": one(lines),
              "seed": one(seed), "steps": one(0 if steps is None else steps)}

    def decode(outputs: dict) -> Detections:
        count = int(outputs["count"][0])
        return Detections(outputs["boxes"][0, :count], outputs["scores"][0, :count], outputs["labels"][0, :count])

    return inputs, decode


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
