"""The Python API for services: ``PosterClient`` wraps a bundle, a backend and the pipelines.

Create it once per process and share it: ``generate`` may be called from many threads at once
(backends are thread-safe, pipelines keep no per-request state), and ``agenerate`` runs the same
call in the client's thread pool for asyncio code::

    client = PosterClient("bundles/paper", backend_url="grpc://10.0.0.5:8001,grpc://10.0.0.6:8001")
    result = client.generate(product=rgb, product_mask=mask, texts=["Summer sale"], seed=7)
    result = await client.agenerate(PosterRequest(...), pipeline="layout")

With a Triton URL the bundle folder needs only its manifest and tokenizers (see
``posterrt repo build --client-bundle``); without one, the ONNX files run in-process.
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .backends import open_backend
from .bundle import Bundle
from .errors import InputError


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

    def generate(self, request=None, *, pipeline: str = "poster", **fields):
        """Run one request: a ``PosterRequest``, or its fields as keyword arguments."""
        from .pipelines.request import PosterRequest

        if request is None:
            request = PosterRequest(**fields)
        elif fields:
            raise InputError(f"generate: give a PosterRequest or its fields, not both (got {sorted(fields)})")
        return self.pipeline(pipeline)(request)

    async def agenerate(self, request=None, *, pipeline: str = "poster", **fields):
        """``generate`` for asyncio: runs in the client's thread pool, the event loop stays free."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self.generate, request, pipeline=pipeline, **fields)
        return await loop.run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> "PosterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
