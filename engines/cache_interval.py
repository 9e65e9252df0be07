"""`posterrt engines cache-interval`: make a feature-cache interval a bundle's default, only if it passes
the gate (cached against uncached output on the fixed requests: ``runtime.accuracy.gate_feature_cache``).

The default lives in the bundle's family configs (``config[<family>]["cache_interval"]``), where the
pipelines read it for requests that name no interval; a failing interval is refused and nothing is
written. The report goes to ``<bundle>/feature_cache-<N>.json`` either way, so a refusal can be read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from posterrt.runtime.accuracy import FEATURE_CACHE_PIPELINES, gate_feature_cache, require_passed
from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.families import FAMILIES


def report_path(bundle_dir: Path, interval: int) -> Path:
    return Path(bundle_dir) / f"feature_cache-{interval}.json"


def set_default_interval(bundle_dir: str | os.PathLike, interval: int,
                         pipelines: Sequence[str] = FEATURE_CACHE_PIPELINES, **settings) -> dict:
    """Gate ``interval`` on ``pipelines``; when it passes, record it as the default of their families.
    Raises ParityError naming every failed check otherwise. Returns the report."""
    bundle_dir = Path(bundle_dir)
    report = gate_feature_cache(Bundle(bundle_dir), interval, pipelines, **settings)
    report_path(bundle_dir, interval).write_text(json.dumps(report, indent=2, default=float))
    require_passed(report, f"cache interval {interval}")
    _record(bundle_dir, interval, [p for p in pipelines if p in report["pipelines"]])
    return report


def _record(bundle_dir: Path, interval: int, pipelines: Sequence[str]) -> None:
    """Write the default into each gated pipeline's family config; the manifest is replaced atomically."""
    path = bundle_dir / MANIFEST
    manifest = json.loads(path.read_text())
    for family in FAMILIES.values():
        if family.stage in pipelines:
            manifest["config"][family.config_key]["cache_interval"] = interval
    temporary = path.with_name(MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(temporary, path)
