"""The client half of the server stages (runtime/server_stages): a stage on the servers of a
``TritonBackend`` that serve it for this bundle, called with the pipeline's own arguments.

``TritonBackend.server_stage(name)`` builds a ``StageClient`` when at least one server has the
stage ready with this bundle's identity (the driven models' hashes and the stage's settings,
recorded by ``posterrt repo build`` in the config); otherwise the pipeline loops itself.

A call runs under the request's control (runtime/progress.py). Over gRPC, where the server has
the stage's streamed model (``<stage>_stream``, decoupled), the request goes on a gRPC stream: its
progress responses become the request's progress events, one per step; cancelling the request
(``PosterJob.cancel``, Ctrl-C, a raising progress callback) cancels the stream, and Triton's
``request.is_cancelled()`` stops the server's loop at its next step. Over HTTP (Triton's HTTP
endpoint refuses decoupled models) the plain model answers, without progress events. Both send
the request's remaining time as Triton's request ``timeout``; the stub stops its loop when it
passes and answers with the deadline error, raised here as ``DeadlineExceeded``.
"""
from __future__ import annotations

import queue
import re
import threading
import time

import numpy as np

from ..contracts import validate_inputs
from ..errors import BackendError, DeadlineExceeded, RequestCancelled
from ..progress import RunControl, current, deadline_message
from ..server_stages import PROGRESS, SERVER_STAGES, ServerStage
from ..triton.model_config import STAGE_SHA256_PARAMETER, WIRE_DTYPES, from_wire, to_wire

#: How often a waiting stream call looks at the request's cancellation and deadline.
POLL_S = 0.005
#: Past the deadline the server answers with its own deadline error within a step; the client
#: waits this much longer before cancelling the stream itself.
DEADLINE_GRACE_S = 1.0
_DEADLINE = re.compile(r"timeout: the request's deadline of .* in stage '(\w+)' at step (\d+) of (\d+)")


class StageClient:
    """``stage`` on ``servers``: ``client(*args)`` takes the arguments of the pipeline code the stage
    replaces (``stage.encode``'s) and returns what that code returns. Servers are tried in order;
    the first that answers wins. ``streaming``: the servers that serve the streamed model."""

    def __init__(self, backend, stage: ServerStage, servers: list, streaming: set):
        self.backend = backend
        self.stage = stage
        self.servers = servers
        self.streaming = streaming
        self.contract = stage.contract(backend.bundle)
        self._local = threading.local()  # per thread and server: an open gRPC stream (a client holds one)
        self._streams: list[_Stream] = []  # every stream opened, closed with the backend
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.stage.name

    def __call__(self, *args, **kwargs):
        inputs, decode = self.stage.encode(self.contract, *args, **kwargs)
        validate_inputs(self.contract, inputs)
        control = current()
        control.check(self.stage.progress_stage)  # a request cancelled or late already does not start
        failures = []
        for server in self.servers:
            try:
                if server in self.streaming:
                    return decode(self._stream(server, inputs, control))
                return decode(self._infer(server, inputs, control))
            except (DeadlineExceeded, RequestCancelled):
                raise
            except BackendError as error:
                failures.append(f"{server.url}: {error}")
            except Exception as error:  # unreachable, overloaded or refusing: the next server may answer
                if not _is_server_error(error):
                    raise  # the request's own progress callback raised: the request stops with it
                failures.append(f"{server.url}: {_describe(error)}")
        raise BackendError(f"model {self.contract.name!r}: no Triton server answered; {'; '.join(failures)}")

    def _items(self, module, inputs: dict, binary: dict) -> list:
        items = []
        for spec in self.contract.inputs:
            array = to_wire(spec, np.ascontiguousarray(inputs[spec.name]))
            item = module.InferInput(spec.name, list(array.shape), WIRE_DTYPES[spec.dtype])
            item.set_data_from_numpy(array, **binary)
            items.append(item)
        return items

    def _outputs(self, result) -> dict:
        return {spec.name: from_wire(spec, result.as_numpy(spec.name)) for spec in self.contract.outputs}

    def _infer(self, server, inputs: dict, control: RunControl) -> dict:
        """The plain model: one request, one answer, no progress."""
        module = server.connections.module
        binary = {"binary_data": True} if server.scheme == "http" else {}
        requested = [module.InferRequestedOutput(spec.name, **binary) for spec in self.contract.outputs]
        budget = self._budget(control)
        with server.connections.client() as client:
            timeout = {"client_timeout": budget} if server.scheme == "grpc" else {}
            try:
                result = client.infer(self.contract.name, self._items(module, inputs, binary), outputs=requested,
                                      timeout=_timeout_us(control), **timeout)
            except Exception as error:
                if _late(control):  # the call's own time ran out with the request's
                    stage = self.stage.progress_stage
                    raise DeadlineExceeded(deadline_message(control.timeout, stage, 0, 0), stage, 0, 0) from None
                raise self._server_error(error) from None
        return self._outputs(result)

    def _stream(self, server, inputs: dict, control: RunControl) -> dict:
        """The streamed model: progress responses, then the answer; the stream is cancelled when the
        request is (or when anything here raises)."""
        stream = self._open_stream(server)
        answered = False
        stage, done, total = self.stage.progress_stage, 0, 0
        give_up = time.monotonic() + self._budget(control)
        try:
            stream.client.async_stream_infer(self.stage.stream_name, self._items(server.connections.module, inputs, {}),
                                             timeout=_timeout_us(control))
            while True:
                try:
                    result, error = stream.responses.get(timeout=POLL_S)
                except queue.Empty:
                    if control.cancelled:
                        raise RequestCancelled(f"cancelled: the request was cancelled in stage {stage!r} at step "
                                               f"{done} of {total}", stage, done, total) from None
                    if _late(control):  # e.g. still queued behind other requests at the server
                        raise DeadlineExceeded(deadline_message(control.timeout, stage, done, total), stage, done,
                                               total) from None
                    if time.monotonic() > give_up:
                        raise BackendError(f"model {self.stage.stream_name!r}: no answer from {server.url} within "
                                           f"the request's time") from None
                    continue
                if error is not None:
                    raise self._server_error(error)
                progress = result.as_numpy(PROGRESS.name)
                if progress is None:
                    answered = True
                    return self._outputs(result)
                step, total = (int(v) for v in progress[0])
                for index in range(done + 1, step + 1):  # the server coalesces fast steps: one event each here
                    done = index
                    control.step(stage, index, total)
        finally:
            if not answered:  # cancelled, late, failed: the only way to stop a streamed request is to cancel its stream
                try:
                    stream.restart()
                except Exception:  # the server is gone: drop the stream, the next call opens a new one
                    self._local.streams.pop(server.url)
                    with self._lock:
                        self._streams.remove(stream)
                    stream.close()

    def _open_stream(self, server) -> "_Stream":
        """This thread's open stream to ``server``: kept across calls (opening one costs a round trip
        and a thread), replaced after a call that did not end with its answer."""
        streams = self._local.__dict__.setdefault("streams", {})
        if server.url not in streams:
            streams[server.url] = _Stream(server.connections.module.InferenceServerClient(server.address))
            with self._lock:
                self._streams.append(streams[server.url])
        return streams[server.url]

    def close(self) -> None:
        """Close every stream this client opened (their response threads end with them)."""
        with self._lock:
            streams, self._streams = self._streams, []
        for stream in streams:
            try:
                stream.close()
            except Exception:  # the server is gone: nothing is left open there
                pass

    def _budget(self, control: RunControl) -> float:
        """Seconds this call may wait: the backend's timeout, or the request's deadline (plus the
        grace the server's own deadline answer needs) when sooner."""
        remaining = control.remaining()
        return self.backend.timeout_s if remaining is None else min(self.backend.timeout_s, remaining + DEADLINE_GRACE_S)

    def _server_error(self, error: Exception) -> Exception:
        text = _describe(error)
        found = _DEADLINE.search(text)
        if found:
            return DeadlineExceeded(text[found.start():], found.group(1), int(found.group(2)), int(found.group(3)))
        return BackendError(f"model {self.contract.name!r}: {text}")


class _Stream:
    """One gRPC stream of one thread to one server. A call ends with its final answer (or the stream
    is restarted) before the next one starts, so every response on the queue is the current call's."""

    def __init__(self, client):
        self.client = client
        self._start()

    def _start(self) -> None:
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error, responses=self.responses: responses.put((result, error)))

    def restart(self) -> None:
        """Cancel the stream (Triton marks its requests cancelled) and open a new one on the same channel."""
        self.client.stop_stream(cancel_requests=True)
        self._start()

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
        finally:
            self.client.close()


def _late(control: RunControl) -> bool:
    """The request's deadline passed longer ago than the server needs to answer with its own error."""
    return control.deadline is not None and time.monotonic() > control.deadline + DEADLINE_GRACE_S


def _timeout_us(control: RunControl) -> int | None:
    """The request's remaining time as Triton's request timeout (microseconds; None: no deadline)."""
    remaining = control.remaining()
    return None if remaining is None else max(1, int(remaining * 1e6))


def find_stage(backend, name: str) -> StageClient | None:
    """A client for stage ``name`` when a server of ``backend`` serves it for this bundle, else None."""
    stage = SERVER_STAGES.get(name)
    if stage is None or not stage.available(backend.bundle):
        return None
    expected = {STAGE_SHA256_PARAMETER: stage.identity(backend.bundle)}
    servers = [server for server in backend.servers if serves_model(server, name, expected)]
    streaming = {server for server in servers
                 if server.scheme == "grpc" and serves_model(server, stage.stream_name, expected)}
    return StageClient(backend, stage, servers, streaming) if servers else None


def serves_model(server, model: str, parameters: dict[str, str]) -> bool:
    """Whether ``server`` has ``model`` ready with config ``parameters`` of these values."""
    try:
        with server.connections.client() as client:
            if not client.is_model_ready(model):
                return False
            config = client.get_model_config(model, **({"as_json": True} if server.scheme == "grpc" else {}))
    except Exception:  # an old server, or one that is down: the client loop works everywhere
        return False
    served = config.get("config", config).get("parameters", {})
    return all(served.get(key, {}).get("string_value") == value for key, value in parameters.items())


def _is_server_error(error: Exception) -> bool:
    """An error of the server or the connection (the next server may answer), not of the caller's code."""
    from tritonclient.utils import InferenceServerException

    return isinstance(error, (InferenceServerException, OSError, ConnectionError, TimeoutError))


def _describe(error: Exception) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    text = (message or type(error).__name__).strip()
    return text.splitlines()[0] if text else type(error).__name__
