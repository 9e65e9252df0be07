"""The Python API for services: ``PosterClient`` wraps a bundle, a backend and the pipelines.

Create it once per process and share it: ``generate`` may be called from many threads at once
(backends are thread-safe, pipelines keep no per-request state), and ``submit`` / ``agenerate``
run the same call in the client's thread pool::

    client = PosterClient("bundles/paper", backend_url="grpc://10.0.0.5:8001,grpc://10.0.0.6:8001")
    result = client.generate(product=rgb, product_mask=mask, texts=["Summer sale"], seed=7,
                             progress=print, timeout=60)
    result = await client.agenerate(PosterRequest(...), pipeline="layout")

    job = client.submit(request, timeout=60)       # from asyncio code
    async for event in job:                        # ProgressEvent(stage, step, total, elapsed_s)
        ...
    result = await job                             # or job.cancel(), client.cancel(job)

Progress, cancellation and deadlines work the same on every backend (runtime/progress.py): the
embedded backend's loops stop between steps, a Triton server stage streams its progress over gRPC
and stops its loop when the request is cancelled or late. ``timeout`` bounds the request's whole
life and raises ``DeadlineExceeded`` naming the stage and the step it reached.

With a Triton URL the bundle folder needs only its manifest and tokenizers (see
``posterrt repo build --client-bundle``); without one, the ONNX files run in-process.
"""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .backends import open_backend
from .bundle import Bundle
from .errors import InputError
from .progress import ProgressCallback, ProgressEvent, RunControl, check_timeout, controlled


class PosterJob:
    """One submitted request: ``cancel()``, ``done()``, ``result()``, ``await job``, and ``async for
    event in job`` (its progress events, in order, until it ends)."""

    def __init__(self, control: RunControl, future: Future, events: asyncio.Queue | None,
                 loop: asyncio.AbstractEventLoop | None):
        self.control, self.future = control, future
        self._events, self._loop = events, loop

    def cancel(self) -> bool:
        """Stop the request at its next step (in this process or in the server). Returns False, and
        changes nothing, when it already finished; its ``result()`` then raises ``RequestCancelled``."""
        if self.future.done():
            return False
        self.control.cancel()
        return True

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None):
        return self.future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()

    def __aiter__(self):
        if self._events is None:
            raise InputError("events: submit the job from a running asyncio loop to iterate over its events")
        return self._iterate()

    async def _iterate(self):
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event


class PosterClient:
    def __init__(self, bundle_dir: str | os.PathLike, backend_url: str | None = None, *, max_workers: int = 4,
                 **backend_options):
        if max_workers < 1:
            raise InputError(f"max_workers: got {max_workers}, expected at least 1")
        self.bundle = Bundle(bundle_dir)
        self.backend = open_backend(self.bundle, backend_url, **backend_options)
        self._pipelines: dict = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="posterrt-client")

    def pipeline(self, name: str = "poster"):
        """The pipeline ``name``, built on first use (tokenizers and configs loaded once)."""
        with self._lock:
            if name not in self._pipelines:
                from .pipelines import build_pipeline

                self._pipelines[name] = build_pipeline(name, self.backend, progress=False)
            return self._pipelines[name]

    def generate(self, request=None, *, pipeline: str = "poster", progress: ProgressCallback | None = None,
                 timeout: float | None = None, **fields):
        """Run one request: a ``PosterRequest``, or its fields as keyword arguments. ``progress(event)``
        is called after each step of each loop (an exception it raises stops the request and is raised
        here); ``timeout`` (seconds) bounds the whole request (``DeadlineExceeded``)."""
        return self._run(RunControl(progress, timeout), self._request(request, fields), pipeline)

    def submit(self, request=None, *, pipeline: str = "poster", progress: ProgressCallback | None = None,
               timeout: float | None = None, **fields) -> PosterJob:
        """Start one request in the client's thread pool and return its ``PosterJob`` at once. Called
        from a running asyncio loop, the job is also an async iterator of its progress events."""
        request = self._request(request, fields)
        check_timeout(timeout)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        events = asyncio.Queue() if loop is not None else None

        def report(event: ProgressEvent) -> None:
            if events is not None:
                loop.call_soon_threadsafe(events.put_nowait, event)
            if progress is not None:
                progress(event)

        control = RunControl(report, timeout)

        def run():
            try:
                return self._run(control, request, pipeline)
            finally:
                if events is not None:
                    loop.call_soon_threadsafe(events.put_nowait, None)

        return PosterJob(control, self._executor.submit(run), events, loop)

    async def agenerate(self, request=None, *, pipeline: str = "poster", progress: ProgressCallback | None = None,
                        timeout: float | None = None, **fields):
        """``generate`` for asyncio: runs in the client's thread pool, the event loop stays free.
        Cancelling the awaiting task cancels the request (it stops at its next step)."""
        job = self.submit(request, pipeline=pipeline, progress=progress, timeout=timeout, **fields)
        try:
            return await job
        except asyncio.CancelledError:
            job.cancel()
            raise

    def cancel(self, job: PosterJob) -> bool:
        """``job.cancel()``: False when the job had already finished."""
        return job.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.backend.close()

    def _request(self, request, fields: dict):
        from .pipelines.request import PosterRequest

        if request is None:
            return PosterRequest(**fields)
        if fields:
            raise InputError(f"generate: give a PosterRequest or its fields, not both (got {sorted(fields)})")
        return request

    def _run(self, control: RunControl, request, pipeline: str):
        pipeline = self.pipeline(pipeline)
        with controlled(control):
            return pipeline(request)

    def __enter__(self) -> "PosterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
