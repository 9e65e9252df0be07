"""The Triton client backend: the same ``Backend.run`` as ONNX Runtime in-process, over HTTP or gRPC.

``TritonBackend(bundle, "grpc://127.0.0.1:8001")`` or several servers, comma-separated or as a list
(``"http://a:8000,http://b:8000"``). What the pipelines never see:

* connections: tritonclient's HTTP client is not thread-safe (its docstring says so) and, built on
  gevent, must stay in the thread that made it; so each thread keeps its own HTTP client per
  server, reused across its requests (keep-alive). The gRPC client is thread-safe (bar streaming,
  unused here): one per server, shared;
* tensors travel as binary data; with ``shared_memory=True`` tensors of at least
  ``shm_threshold_bytes`` go through system shared memory regions from a pool the backend owns
  (servers on this host only);
* requests are spread round robin over the servers. A server that cannot be reached (or is
  shutting down, or does not answer in time) is marked down, the request goes to the next one, and
  the down server is used again only after it passes a health check and still serves the bundle's
  weights (a restarted server may serve another repository); when every server is down, the
  backend retries with exponential backoff;
* ``timeout_s`` bounds one ``run`` call, retries and backoff included: it answers or raises a
  ``BackendError`` within that time, whatever the servers do (killed, restarted, hung).
  ``attempt_timeout_s`` bounds one try on one server (default: the whole remaining budget); set it
  below ``timeout_s`` so that a hung server among several costs one attempt, not the request;
* at connect, every model each server serves is checked against the bundle: tensor names,
  datatypes and shapes against the contract, and the ONNX hash the repository recorded against
  the bundle's manifest. A mismatch fails at once, naming the model and the tensor;
* the checks follow rolling updates: an answer from a model version not checked yet (a server
  reloaded from the store, ``posterrt repo reload``) has that version checked first, and
  ``Server.answered_versions`` counts the answers of each (model, version).
"""
from __future__ import annotations

import collections
import importlib
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..bundle import Bundle
from ..contracts import ModelContract, _parse_symbol
from ..errors import BackendError, ContractError, InputError
from ..triton.model_config import ONNX_SHA256_PARAMETER, WIRE_DTYPES, from_wire, to_wire, triton_shape
from .base import Backend

SCHEMES = {"http": "tritonclient.http", "grpc": "tritonclient.grpc"}
# Statuses / messages meaning "this server cannot take the request now": try another server.
_RETRYABLE_STATUS = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.DEADLINE_EXCEEDED",
                     "StatusCode.NOT_FOUND", "502", "503", "504"}
_RETRYABLE_TEXT = ("unknown model", "no available versions", "is not ready", "server is stopping",
                   "failed to obtain inference response")  # the last: tritonclient HTTP's timeout


class ServerUnavailable(Exception):
    """Internal: the request did not reach a working server; it is safe to send it elsewhere."""


class CallTimeout(Exception):
    """Internal: a call to a server did not return within its share of the deadline."""


#: A health check of a down server waits at most this long (a hung server must not eat the budget).
HEALTH_CHECK_TIMEOUT_S = 2.0


def bounded_call(scheme: str, method, seconds: float, *args, **kwargs):
    """``method(*args, **kwargs)`` on a tritonclient client, returning or raising within ``seconds``.

    gRPC calls take a deadline (``client_timeout``). tritonclient's HTTP client only has timeouts
    per socket operation, fixed when the client is made (a server that trickles bytes holds it far
    longer, and a per-thread client cannot follow each call's remaining budget); it runs on gevent
    in the calling thread, so a ``gevent.Timeout`` there interrupts it at its next wait. The interrupted client is closed by ``Connections.client`` (any exception but a
    refusal drops the connection)."""
    seconds = max(seconds, 0.001)
    if scheme == "grpc":
        return method(*args, client_timeout=seconds, **kwargs)
    import gevent

    with gevent.Timeout(seconds, CallTimeout(f"no answer within {seconds:.1f} s")):
        return method(*args, **kwargs)


class Connections:
    """tritonclient clients of one server, reused across requests.

    gRPC: one client shared by every thread. HTTP: one client per thread, kept for that thread's
    next requests; clients of threads that ended are closed when the next one is made, so a
    service whose worker threads come and go does not pile up connections. A client whose call
    failed for any reason but a refused request is closed: its connection may be half-dead."""

    def __init__(self, module, scheme: str, address: str, timeout_s: float):
        self.module, self.scheme, self.address, self.timeout_s = module, scheme, address, timeout_s
        self._lock = threading.Lock()
        self._local = threading.local()
        self._shared = None
        self._per_thread: list[tuple[threading.Thread, object]] = []

    def _shared_client(self):
        with self._lock:
            if self._shared is None:
                self._shared = self.module.InferenceServerClient(self.address)
            return self._shared

    def _thread_client(self):
        client = getattr(self._local, "client", None)
        if client is not None:
            return client
        client = self.module.InferenceServerClient(self.address, connection_timeout=self.timeout_s,
                                                   network_timeout=self.timeout_s)
        with self._lock:
            ended = [c for thread, c in self._per_thread if not thread.is_alive()]
            self._per_thread = [(t, c) for t, c in self._per_thread if t.is_alive()]
            self._per_thread.append((threading.current_thread(), client))
        for old in ended:
            _close_quietly(old)
        self._local.client = client
        return client

    @contextmanager
    def client(self):
        if self.scheme == "grpc":
            yield self._shared_client()
            return
        client = self._thread_client()
        try:
            yield client
        except (BackendError, ContractError):  # the server refused the request: the connection is fine
            raise
        except BaseException:
            self._local.client = None
            with self._lock:
                self._per_thread = [(t, c) for t, c in self._per_thread if c is not client]
            _close_quietly(client)
            raise

    def close(self) -> None:
        with self._lock:
            clients = [c for _, c in self._per_thread] + ([self._shared] if self._shared is not None else [])
            self._per_thread, self._shared = [], None
        for client in clients:
            _close_quietly(client)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # a client of a dead server may fail to close; nothing is left to free
        pass


@dataclass(eq=False)
class Server:
    url: str  # as the user wrote it: grpc://host:port
    scheme: str
    address: str  # host:port, what tritonclient takes
    connections: Connections
    models: set = field(default_factory=set)  # models verified against the bundle
    down_since: float | None = None
    last_error: str = ""  # why the last request failed here
    answered: int = 0  # requests this server answered (for logs and tests)
    failures: int = 0  # requests that failed here and went to another server
    verified: set = field(default_factory=set)  # (model, version) checked against the bundle
    answered_versions: collections.Counter = field(default_factory=collections.Counter)  # (model, version) -> answers


def parse_urls(urls: str | Sequence[str], flag: str = "--backend") -> list[tuple[str, str, str]]:
    """``"http://a:8000,grpc://b:8001"`` -> [(url, scheme, "a:8000"), ...]; errors name ``flag``."""
    items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u and u.strip()]
    if not items:
        raise InputError(f"{flag}: no Triton URL given; expected http://HOST:PORT or grpc://HOST:PORT")
    parsed = []
    for url in items:
        scheme, sep, address = url.partition("://")
        if not sep or scheme not in SCHEMES or not address or "/" in address.rstrip("/"):
            raise InputError(f"{flag}: {url!r} is not a Triton URL; expected http://HOST:PORT or grpc://HOST:PORT")
        parsed.append((url, scheme, address.rstrip("/")))
    return parsed


def axis_sizes(contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Base sizes of the dynamic axes (``height`` from a ``height/8`` axis too), to size outputs."""
    sizes = {}
    for spec in contract.inputs:
        for symbol, size in zip(spec.shape, inputs[spec.name].shape):
            if isinstance(symbol, str):  # resolved contracts keep only dynamic axes symbolic
                name, op, factor = _parse_symbol(symbol)
                sizes[name] = size * factor if op == "/" else size // factor if op == "*" else size
    return sizes


def _output_shape(spec, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """An output's shape when the inputs fix it; None when the model decides (``memory_tokens``)."""
    try:
        return spec.concrete_shape(sizes)
    except ContractError:
        return None


class TritonBackend(Backend):
    def __init__(self, bundle: Bundle, urls: str | Sequence[str], *, models: Sequence[str] | None = None,
                 timeout_s: float = 120.0, attempt_timeout_s: float | None = None, retries: int = 3,
                 backoff_s: float = 0.25, max_backoff_s: float = 2.0, recheck_s: float = 1.0,
                 shared_memory: bool = False, shm_threshold_bytes: int = 1 << 20, verify: bool = True):
        super().__init__(bundle)
        if not timeout_s > 0:
            raise InputError(f"timeout_s: got {timeout_s!r}, expected a positive number of seconds")
        if retries < 0:
            raise InputError(f"retries: got {retries!r}, expected 0 or more rounds")
        if attempt_timeout_s is not None and not attempt_timeout_s > 0:
            raise InputError(f"attempt_timeout_s: got {attempt_timeout_s!r}, expected a positive number of seconds")
        self.timeout_s = timeout_s  # the whole budget of one run(), retries included
        self.attempt_timeout_s = attempt_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.verify = verify
        self.recheck_s = recheck_s  # a down server is health-checked at most this often
        self.shm_threshold_bytes = shm_threshold_bytes
        self.servers = [Server(url, scheme, address,
                               Connections(importlib.import_module(SCHEMES[scheme]), scheme, address, timeout_s))
                        for url, scheme, address in parse_urls(urls)]
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._stage_clients: list = []  # server-stage clients handed out (triton_stages.StageClient)
        self._shm = None
        if shared_memory:
            from ..triton.shm import SharedMemoryPool

            self._shm = SharedMemoryPool()
        if models is not None:
            bundle.require(models)
        self._connect(list(models) if models is not None else None, verify)

    # -- connect-time checks --------------------------------------------------------------------
    def _metadata(self, server: Server, model: str, seconds: float, version: str = "") -> tuple[dict, dict]:
        with server.connections.client() as client:
            if server.scheme == "grpc":
                return (bounded_call("grpc", client.get_model_metadata, seconds, model, version, as_json=True),
                        bounded_call("grpc", client.get_model_config, seconds, model, version, as_json=True)["config"])
            return (bounded_call("http", client.get_model_metadata, seconds, model, version),
                    bounded_call("http", client.get_model_config, seconds, model, version))

    def _ready_models(self, server: Server, seconds: float) -> set[str]:
        with server.connections.client() as client:
            index = bounded_call("grpc", client.get_model_repository_index, seconds, as_json=True) \
                if server.scheme == "grpc" else bounded_call("http", client.get_model_repository_index, seconds)
        if isinstance(index, dict):
            index = index.get("models", [])
        return {m["name"] for m in index if m.get("state") == "READY"}

    def _connect(self, models: list[str] | None, verify: bool) -> None:
        unreachable = []  # every server is tried, so that the error names each one that cannot be reached
        for server in self.servers:
            try:
                ready = self._ready_models(server, self.timeout_s)
            except Exception as error:
                unreachable.append((server.url, _describe(error)))
                continue
            wanted = models if models is not None else [m for m in self.bundle.models if m in ready]
            missing = [m for m in wanted if m not in ready]
            if missing:
                raise BackendError(f"Triton server {server.url} does not serve {missing} (ready: {sorted(ready)}); "
                                   f"build the repository with `posterrt repo build --bundle {self.bundle.root}`")
            for model in wanted:
                if verify:
                    self._verify(server, model)
                server.models.add(model)
        if len(unreachable) == 1:
            raise BackendError("Triton server {} cannot be reached: {}".format(*unreachable[0]))
        if unreachable:
            raise BackendError(f"{len(unreachable)} Triton servers cannot be reached: "
                               + "; ".join(f"{url} ({reason})" for url, reason in unreachable))

    def _verify(self, server: Server, model: str, seconds: float | None = None, version: str = "") -> None:
        """The server's view of ``model`` (its latest version, or ``version``) must be the bundle's
        contract and weights."""
        contract = self.contract(model)
        metadata, config = self._metadata(server, model, self.timeout_s if seconds is None else seconds, version)
        where = f"Triton server {server.url} model {model!r}" + (f" version {version}" if version else "")
        for kind, specs in (("input", contract.inputs), ("output", contract.outputs)):
            served = {t["name"]: t for t in metadata.get(kind + "s", [])}
            if set(served) != {s.name for s in specs}:
                raise BackendError(f"{where}: {kind}s are {sorted(served)}, the contract expects "
                                   f"{sorted(s.name for s in specs)}; rebuild the repository from this bundle")
            for spec in specs:
                got = served[spec.name]
                shape = [int(d) for d in got["shape"]]
                if got["datatype"] != WIRE_DTYPES[spec.dtype] or shape != triton_shape(spec):
                    raise BackendError(f"{where}: {kind} {spec.name!r} is {got['datatype']}{shape}, the contract "
                                       f"expects {WIRE_DTYPES[spec.dtype]}{triton_shape(spec)}")
        served_hash = config.get("parameters", {}).get(ONNX_SHA256_PARAMETER, {}).get("string_value")
        expected_hash = self.bundle.models[model].sha256
        if served_hash and served_hash != expected_hash:
            raise BackendError(f"{where}: serves weights {served_hash[:12]}..., the bundle has {expected_hash[:12]}...; "
                               f"the repository was built from another export")
        checked = version or max(metadata.get("versions") or ["1"], key=int)
        with self._lock:
            server.verified.add((model, str(checked)))

    def _follow_version(self, server: Server, model: str, result, seconds: float) -> None:
        """Count an answer under its model version; a version not checked yet (a rolling update
        reached this server) is checked against the bundle before its answer is used."""
        response = result.get_response()
        version = str(response.get("model_version", "") if isinstance(response, dict) else response.model_version)
        if self.verify and version and (model, version) not in server.verified:
            try:
                self._verify(server, model, max(seconds, HEALTH_CHECK_TIMEOUT_S), version)
            except (BackendError, ContractError):
                raise
            except Exception as error:  # the version went away while we asked: try another server
                raise ServerUnavailable(f"version {version} of {model!r} could not be checked: {_describe(error)}") \
                    from None
        with self._lock:
            server.answered_versions[(model, version)] += 1

    # -- server choice ------------------------------------------------------------------------
    def _mark_down(self, server: Server, reason: str) -> None:
        with self._lock:
            server.down_since = time.monotonic()
            server.failures += 1
            server.last_error = reason
        if self._shm is not None:
            self._shm.forget_server(server.url)

    def _healthy(self, server: Server, deadline: float) -> bool:
        """Up servers are used; a down one only once ``recheck_s`` passed, a health check passes and
        it still serves the bundle's weights (it may have been restarted on another repository)."""
        if server.down_since is None:
            return True
        if time.monotonic() - server.down_since < self.recheck_s:
            return False
        seconds = min(HEALTH_CHECK_TIMEOUT_S, deadline - time.monotonic())
        if seconds <= 0:
            return False
        try:
            with server.connections.client() as client:
                ready = bool(bounded_call(server.scheme, client.is_server_ready, seconds))
            if ready and self.verify:
                for model in sorted(server.models):
                    self._verify(server, model, seconds)
        except BackendError as error:  # back, but serving something else: keep it out
            ready = False
            server.last_error = str(error)
        except Exception:
            ready = False
        with self._lock:
            server.down_since = None if ready else time.monotonic()
        return ready

    def _candidates(self, model: str, deadline: float) -> list[Server]:
        serving = [s for s in self.servers if model in s.models]
        if not serving:
            raise BackendError(f"no Triton server among {[s.url for s in self.servers]} serves model {model!r}")
        start = next(self._turn) % len(serving)
        ordered = serving[start:] + serving[:start]
        return [s for s in ordered if self._healthy(s, deadline)]

    # -- inference ----------------------------------------------------------------------------
    def _run(self, contract: ModelContract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError("the Triton backend is closed")
        started = time.monotonic()
        deadline = started + self.timeout_s
        failures = []
        for attempt in range(self.retries + 1):
            for server in self._candidates(contract.name, deadline):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self.attempt_timeout_s is not None:
                    remaining = min(remaining, self.attempt_timeout_s)
                try:
                    outputs = self._infer(server, contract, inputs, remaining)
                except ServerUnavailable as error:
                    self._mark_down(server, str(error))
                    failures.append(f"{server.url}: {error}")
                    continue
                with self._lock:
                    server.answered += 1
                return outputs
            pause = min(self.backoff_s * 2 ** attempt, self.max_backoff_s, deadline - time.monotonic())
            if attempt == self.retries or pause <= 0:
                break
            time.sleep(pause)
        last = failures[-1] if failures else next((f"{s.url}: {s.last_error}" for s in self.servers if s.last_error),
                                                  "every server failed its health check")
        spent = time.monotonic() - started
        why = (f"within its timeout of {self.timeout_s:g} s" if deadline - time.monotonic() <= 0
               else f"after {attempt + 1} rounds ({spent:.1f} s)")
        raise BackendError(f"model {contract.name!r}: no Triton server answered {why} over "
                           f"{[s.url for s in self.servers]}; last: {last}")

    def _infer(self, server: Server, contract: ModelContract, inputs: dict[str, np.ndarray],
               seconds: float) -> dict[str, np.ndarray]:
        with server.connections.client() as client:
            return self._infer_with(client, server, contract, inputs, seconds)

    def _infer_with(self, client, server: Server, contract: ModelContract,
                    inputs: dict[str, np.ndarray], seconds: float) -> dict[str, np.ndarray]:
        module = server.connections.module
        checked_out = []  # shared-memory regions of this request, returned to the pool at the end
        try:
            sizes = axis_sizes(contract, inputs) if self._shm is not None else {}
            infer_inputs = []
            for spec in contract.inputs:
                array = to_wire(spec, np.ascontiguousarray(inputs[spec.name]))
                item = module.InferInput(spec.name, list(array.shape), WIRE_DTYPES[spec.dtype])
                if self._use_shm(array.nbytes):
                    region = self._region(server, client, array.nbytes, checked_out)
                    self._shm.write(region, array)
                    item.set_shared_memory(region.name, array.nbytes)
                elif server.scheme == "http":
                    item.set_data_from_numpy(array, binary_data=True)
                else:
                    item.set_data_from_numpy(array)
                infer_inputs.append(item)
            requested, shm_outputs = [], {}
            for spec in contract.outputs:
                item = module.InferRequestedOutput(spec.name, binary_data=True) if server.scheme == "http" else \
                    module.InferRequestedOutput(spec.name)
                shape = _output_shape(spec, sizes) if self._shm is not None else None
                nbytes = int(np.prod(shape)) * spec.np_dtype.itemsize if shape is not None else 0
                if self._use_shm(nbytes):
                    region = self._region(server, client, nbytes, checked_out)
                    item.set_shared_memory(region.name, nbytes)
                    shm_outputs[spec.name] = (region, shape)
                requested.append(item)
            result = self._call(server, client, contract.name, infer_inputs, requested, seconds)
            outputs = {}
            for spec in contract.outputs:
                if spec.name in shm_outputs:
                    region, shape = shm_outputs[spec.name]
                    outputs[spec.name] = self._shm.read(region, spec.np_dtype, shape)
                else:
                    outputs[spec.name] = from_wire(spec, result.as_numpy(spec.name))
            return outputs
        finally:
            for region in checked_out:
                self._shm.release(region)

    def _call(self, server: Server, client, model: str, infer_inputs, requested, seconds: float):
        try:
            result = bounded_call(server.scheme, client.infer, seconds, model, infer_inputs, outputs=requested)
        except Exception as error:
            if _retryable(error):
                raise ServerUnavailable(_describe(error)) from None
            raise BackendError(f"Triton server {server.url} refused model {model!r} request: {_describe(error)}") from None
        self._follow_version(server, model, result, seconds)
        return result

    def _use_shm(self, nbytes: int) -> bool:
        return self._shm is not None and nbytes >= self.shm_threshold_bytes

    def _region(self, server: Server, client, nbytes: int, checked_out: list):
        region = self._shm.acquire(nbytes)
        checked_out.append(region)
        try:
            self._shm.ensure_registered(region, server.url, client)
        except Exception as error:
            if _retryable(error):
                raise ServerUnavailable(_describe(error)) from None
            raise BackendError(f"Triton server {server.url}: cannot register shared memory ({_describe(error)}); "
                               f"shared memory needs the server on this host") from None
        return region

    # -- server stages ------------------------------------------------------------------------
    def server_stage(self, name: str):
        """A client for stage ``name`` when a server serves it with this bundle's models and settings."""
        from .triton_stages import find_stage

        stage = find_stage(self, name)
        if stage is not None:
            with self._lock:
                self._stage_clients.append(stage)  # its open streams are closed with the backend
        return stage

    # -- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stage in self._stage_clients:
            stage.close()
        if self._shm is not None:
            for server in self.servers:
                try:  # the server unmaps our regions before we unlink them
                    with server.connections.client() as client:
                        for region in self._shm.regions_on(server.url):
                            client.unregister_system_shared_memory(region.name)
                except Exception:  # server gone: nothing registered there any more
                    pass
            self._shm.close()
        for server in self.servers:
            server.connections.close()


def _retryable(error: Exception) -> bool:
    from tritonclient.utils import InferenceServerException

    if not isinstance(error, InferenceServerException):
        return True  # socket errors, timeouts, resets: the request never got a server's answer
    status = str(error.status() or "")
    text = (error.message() or "").lower()
    return status in _RETRYABLE_STATUS or any(fragment in text for fragment in _RETRYABLE_TEXT)


def _describe(error: Exception) -> str:
    from tritonclient.utils import InferenceServerException

    text = (error.message() if isinstance(error, InferenceServerException) else None) or f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
