"""Stage bookkeeping of a pipeline run: wall time per stage and a tqdm bar over the stages."""
from __future__ import annotations

import time
from contextlib import contextmanager

from tqdm import tqdm


class Stages:
    """``with Stages("poster", ["background", "layout"], progress) as stages:`` then
    ``with stages("background"): ...`` for each; ``stages.timings`` maps stage -> seconds."""

    def __init__(self, pipeline: str, names: list[str] | tuple[str, ...], progress: bool = True):
        self.timings: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc=pipeline, unit="stage", disable=not progress)

    @contextmanager
    def __call__(self, name: str):
        self.bar.set_postfix_str(name)
        started = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - started
        self.bar.update()

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
