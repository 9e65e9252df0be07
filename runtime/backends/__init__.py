"""Backends run served models; pipelines take any of them. ``open_backend`` picks one from a URL."""
from __future__ import annotations

from ..bundle import Bundle
from .base import Backend

EMBEDDED = (None, "", "embedded", "onnxruntime")


def open_backend(bundle: Bundle, url: str | None = None, **options) -> Backend:
    """The backend for ``url``.

    * None, ``"embedded"`` or ``"onnxruntime"``: ONNX Runtime in this process (``OrtBackend``);
    * ``http://HOST:PORT`` / ``grpc://HOST:PORT``, comma-separated for several servers:
      ``TritonBackend`` (options: timeout_s, retries, shared_memory, models, ...).
    Backends are imported only when chosen, so a Triton client never loads the ORT backend's
    sessions and the reverse.
    """
    from ..errors import InputError

    if url in EMBEDDED:
        from .onnxruntime import OrtBackend

        return OrtBackend(bundle, **options)
    if isinstance(url, str) and url.split("://", 1)[0] in ("http", "grpc"):
        from .triton import TritonBackend

        return TritonBackend(bundle, url, **options)
    raise InputError(f"--backend: {url!r} is not a backend; expected 'embedded', 'onnxruntime', "
                     f"http://HOST:PORT or grpc://HOST:PORT (comma-separated for several servers)")


__all__ = ["Backend", "open_backend"]
