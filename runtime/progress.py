"""Progress, cancellation and deadlines of one request, whatever runs it.

A request runs under a ``RunControl``: the progress callback, the deadline (``timeout`` seconds
from its start) and a cancellation flag. Every long loop calls ``current().step(stage, i, n)``
after its step i of n: that reports a ``ProgressEvent`` and, between steps, stops the loop with
``RequestCancelled`` or ``DeadlineExceeded``. The same loops run in this process (embedded backend)
and inside a Triton server stage, where the stub installs a control whose callback streams the
events back and whose cancellation is Triton's ``request.is_cancelled()``; the client turns them
into the same events and errors.

The control is found through a context variable, so pipelines (shared by every thread) keep no
per-request state and their signatures stay the paper's. Outside any request ``current()`` is a
control with no callback, no deadline and no way to be cancelled.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

from .errors import DeadlineExceeded, InputError, RequestCancelled

#: An outside cancellation source (Triton's ``request.is_cancelled``, one message to the server
#: process per call) is asked at most this often: PlanNet's steps take well under a millisecond.
CANCEL_POLL_S = 0.005


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # the pipeline stage (runtime/families.py): plan, layout, background, render
    step: int  # steps done, 1..total
    total: int
    elapsed_s: float  # since the request started


ProgressCallback = Callable[[ProgressEvent], None]


def check_timeout(timeout) -> float | None:
    """``timeout`` in seconds: None (no deadline) or a positive finite number."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise InputError(f"timeout: got {timeout!r}, expected a positive number of seconds (None: no deadline)")
    return float(timeout)


class RunControl:
    """One request's progress callback, deadline and cancellation.

    ``progress(event)`` is called in the thread that runs the loop; an exception it raises stops the
    request and is raised to the caller (the loop, local or in a server, is stopped). ``timeout``:
    seconds from now; ``is_cancelled``: an outside source of cancellation besides ``cancel()``."""

    def __init__(self, progress: ProgressCallback | None = None, timeout: float | None = None,
                 is_cancelled: Callable[[], bool] | None = None):
        self.timeout = check_timeout(timeout)
        self.started = time.monotonic()
        self.deadline = None if self.timeout is None else self.started + self.timeout
        self.progress = progress
        self._cancelled = threading.Event()
        self._is_cancelled = is_cancelled
        self._polled = 0.0

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if not self._cancelled.is_set() and self._is_cancelled is not None:
            now = time.monotonic()
            if now - self._polled >= CANCEL_POLL_S:
                self._polled = now
                if self._is_cancelled():
                    self._cancelled.set()
        return self._cancelled.is_set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline); may be negative."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def step(self, stage: str, step: int, total: int) -> None:
        """Step ``step`` of ``total`` of ``stage`` is done: report it, then stop here if the request
        was cancelled or its deadline passed."""
        if self.progress is not None:
            self.progress(ProgressEvent(stage, step, total, time.monotonic() - self.started))
        self.check(stage, step, total)

    def check(self, stage: str, step: int = 0, total: int = 0) -> None:
        if self.cancelled:
            raise RequestCancelled(f"cancelled: the request was cancelled in stage {stage!r} at step {step} of {total}",
                                   stage, step, total)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(deadline_message(self.timeout, stage, step, total), stage, step, total)


def deadline_message(timeout: float, stage: str, step: int, total: int) -> str:
    return f"timeout: the request's deadline of {timeout:.3g} s passed in stage {stage!r} at step {step} of {total}"


_NO_CONTROL = RunControl()
_current: ContextVar[RunControl] = ContextVar("posterrt_run_control", default=_NO_CONTROL)


def current() -> RunControl:
    """The control of the request this thread runs (a no-op one outside any)."""
    return _current.get()


@contextmanager
def controlled(control: RunControl):
    """Run the block under ``control``."""
    token = _current.set(control)
    try:
        yield control
    finally:
        _current.reset(token)
