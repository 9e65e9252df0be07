"""Rolling reloads: the servers of a fleet (``--model-control explicit``) load the versions a push made live.

One server at a time, so the others take the requests while it loads. Triton loads the new version
beside the serving one and swaps them when it is ready (requests in flight finish on the old one),
and a version that fails to load leaves the old one serving; the client retries a request that met
the swap on another server.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

from ..errors import BackendError

CLIENTS = {"http": "tritonclient.http", "grpc": "tritonclient.grpc"}


def _client(scheme: str, address: str, timeout_s: float):
    module = importlib.import_module(CLIENTS[scheme])
    if scheme == "http":
        return module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
    return module.InferenceServerClient(address)


def served_versions(client, scheme: str) -> dict[str, int]:
    """{model: version} of the ready models of one server."""
    index = client.get_model_repository_index(as_json=True) if scheme == "grpc" else client.get_model_repository_index()
    if isinstance(index, dict):
        index = index.get("models", [])
    return {m["name"]: int(m["version"]) for m in index if m.get("state") == "READY" and m.get("version")}


def rolling_reload(servers: Sequence[tuple[str, str, str]], live: dict[str, int] | None = None,
                   models: Sequence[str] | None = None, *, timeout_s: float = 600.0,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Reload ``models`` (default: those whose served version differs from ``live``, the store's)
    on each of ``servers`` ((url, scheme, address) as ``parse_urls`` gives them); returns
    {url: {model: version served after}}."""
    assert models is not None or live is not None, "name the models or give the store's live versions"
    after = {}
    for url, scheme, address in servers:
        client = _client(scheme, address, timeout_s)
        try:
            try:
                before = served_versions(client, scheme)
            except Exception as error:
                raise BackendError(f"Triton server {url} cannot be reached: {error}") from None
            wanted = list(models) if models is not None else sorted(
                m for m, version in live.items() if before.get(m) != version)
            for model in wanted:
                try:
                    client.load_model(model)
                except Exception as error:  # Triton keeps the loaded version serving
                    raise BackendError(f"Triton server {url} could not load model {model!r} "
                                       f"({str(error).strip().splitlines()[0]}); it still serves version "
                                       f"{before.get(model, 'none')}; fix the store and reload again") from None
            after[url] = served_versions(client, scheme)
            if wanted:
                log(f"{url}: reloaded " + ", ".join(f"{m} v{before.get(m, '-')} -> v{after[url].get(m, '-')}"
                                                    for m in wanted))
            else:
                log(f"{url}: already serves the store's versions")
        finally:
            client.close()
    return after
