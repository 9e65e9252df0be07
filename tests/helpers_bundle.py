"""Bundle copies for tests that write variants into a bundle."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from posterrt.runtime.bundle import MANIFEST


def linked_bundle_copy(source: Path, target: Path) -> Path:
    """A copy of a bundle that `engines optimize` may write into, without copying every model:
    files hardlinked (optimize only adds files and replaces the manifest by rename), the manifest
    copied, and external weights (``*.data``: the UNets' cached steps share one) copied, since onnx
    refuses to read external data from a file with several links."""
    shutil.copytree(source, target, copy_function=lambda src, dst: (shutil.copy2 if src.endswith(".data") else os.link)(src, dst))
    (target / MANIFEST).unlink()
    shutil.copy2(source / MANIFEST, target / MANIFEST)
    return target
