"""Backends run served models; pipelines take any of them. ``open_backend`` picks one from a URL."""
from __future__ import annotations

import logging

from ..bundle import Bundle
from .base import Backend

EMBEDDED = (None, "", "embedded", "onnxruntime")


def open_backend(bundle: Bundle, url: str | None = None, **options) -> Backend:
    """The backend for ``url``.

    * None, ``"embedded"`` or ``"onnxruntime"``: ONNX Runtime in this process (``OrtBackend``).
      Without ``variants`` (or with None) it runs the default CPU variants of this CPU kind
      (``runtime/cpu_variants.py``; logged in one line on the ``posterrt`` logger); ``variants={}``
      runs the exported fp32 files, a ``{model: variant}`` mapping exactly those variants;
    * ``http://HOST:PORT`` / ``grpc://HOST:PORT``, comma-separated for several servers:
      ``TritonBackend`` (options: timeout_s, retries, shared_memory, models, ...).
    Backends are imported only when chosen, so a Triton client never loads the ORT backend's
    sessions and the reverse.
    """
    from ..errors import InputError

    if url in EMBEDDED:
        from .onnxruntime import OrtBackend

        if options.get("variants") is None:
            from ..cpu_variants import choose_variants

            choice = choose_variants(bundle, None)
            logging.getLogger("posterrt").info(choice.line(flag="variants"))
            options["variants"] = choice.variants
        return OrtBackend(bundle, **options)
    if isinstance(url, str) and url.split("://", 1)[0] in ("http", "grpc"):
        from .triton import TritonBackend

        return TritonBackend(bundle, url, **options)
    raise InputError(f"--backend: {url!r} is not a backend; expected 'embedded', 'onnxruntime', "
                     f"http://HOST:PORT or grpc://HOST:PORT (comma-separated for several servers)")


__all__ = ["Backend", "open_backend"]
