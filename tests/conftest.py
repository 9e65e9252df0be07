"""Session fixtures: tiny real artifacts built once and shared by every test module."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores: keep torch and ONNX Runtime from each spawning a full pool per process.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny preset of every served model, exported through the real `posterrt export` code."""
    from posterrt.export.bundle_writer import export_bundle
    from posterrt.export.registry import parse_models

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle("tiny", parse_models(None), out, progress=False)
    return out
