"""Input data for NVIDIA perf_analyzer (`--input-data FILE`), one JSON per served model.

Triton strips the batch axis (`max_batch_size` > 0), so shapes here omit it; a `[batch]` tensor
becomes shape `[1]`, matching the repository's `dims: [1] reshape: { shape: [] }`.
"""
from __future__ import annotations

import json
from pathlib import Path

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.samples import default_sizes, sample_inputs

from .models import BATCH_AXES


def perf_analyzer_inputs(bundle: Bundle, model: str, image_size: int = 256, seed: int = 0) -> dict:
    sizes = default_sizes("opt")
    sizes.update({axis: 1 for axis in BATCH_AXES}, height=image_size, width=image_size)
    arrays = sample_inputs(bundle.contract(model), sizes, seed)
    entry = {}
    for name, array in arrays.items():
        item = array[0]
        shape = list(item.shape) or [1]
        entry[name] = {"content": item.reshape(-1).tolist(), "shape": shape}
    return {"data": [entry]}


def write_perf_inputs(bundle: Bundle, out: Path, image_size: int = 256) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in bundle.models:
        path = out / f"{model}.json"
        path.write_text(json.dumps(perf_analyzer_inputs(bundle, model, image_size)))
        written.append(path)
    return written
