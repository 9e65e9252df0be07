"""Start the ``tritonserver`` that the nvidia-pytriton wheel ships, on a posterrt model repository.

No container: the wheel holds the binary (Triton 2.51), its shared libraries and the Python backend
with one stub per Python version. Like pytriton itself, we assemble a backend folder holding the
stub that matches the running Python (a temporary folder of our own: site-packages is never
written), put the wheel's libraries and the interpreter's ``libpython`` on ``LD_LIBRARY_PATH``, and
put the interpreter's ``bin`` first on ``PATH`` so the stub's embedded Python finds this
environment (and so onnxruntime, numpy and posterrt) the same way ``python`` would.

``TritonServer`` is a context manager used by ``posterrt serve`` and by the tests: it checks the
ports, starts the process in its own process group, forwards its log (prefixed), waits until every
model is ready, and stops it with SIGTERM (SIGKILL after a grace period).

The repository is a local folder or an object-store URL (``s3://BUCKET/PREFIX``, see store.py):
tritonserver reads S3 itself, with the AWS credentials of its environment; the store is checked
first so that a wrong URL, key or bucket is one clear line rather than a failed start.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import BackendError, InputError
from .store import StoreStatus, check_store, is_store_url, parse_store_url

MODEL_CONTROL_MODES = ("none", "explicit", "poll")
LOG_PREFIX = "[tritonserver] "
# Triton's log lines start with a severity letter and a date: "E1125 12:45:58.186259 ..."
_ERROR_LINE = re.compile(r"^E\d{4} [\d:.]+\s+\d+\s+[\w.]+:\d+\]\s*(.*)$")
# errors every start on a machine without a GPU logs; they explain nothing
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)


@dataclass(frozen=True)
class TritonDistribution:
    """The pieces of the wheel's Triton installation this module needs."""

    binary: Path
    libraries: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    caches: Path


def find_tritonserver() -> TritonDistribution:
    """Locate the binary and its parts in the installed nvidia-pytriton wheel (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise BackendError("tritonserver not found: the nvidia-pytriton wheel is not installed "
                           "(pip install 'posterrt[serve]')")
    package = Path(spec.origin).parent
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libraries = package.parent / "nvidia_pytriton.libs"
    if not libraries.is_dir():  # an editable pytriton keeps them inside the package
        libraries = root / "external_libs"
    distribution = TritonDistribution(
        binary=root / "bin" / "tritonserver", libraries=libraries, python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub", caches=root / "caches")
    for what, path in (("binary", distribution.binary), ("Python backend", distribution.python_backend / "libtriton_python.so"),
                       (f"Python {version} backend stub", distribution.stub)):
        if not path.exists():
            raise BackendError(f"tritonserver {what} not found at {path}; reinstall nvidia-pytriton "
                               f"(it ships stubs for Python 3.8-3.13)")
    return distribution


def prepare_backend_folder(distribution: TritonDistribution, folder: Path) -> Path:
    """``folder/python/`` = the wheel's Python backend + this Python's stub; returns ``folder``."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in distribution.python_backend.iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    # The backend starts the stub found beside libtriton_python.so; a copy, so it resolves its
    # libraries from LD_LIBRARY_PATH rather than from the wheel's folder layout.
    shutil.copy2(distribution.stub, python / "triton_python_backend_stub")
    return folder


def server_environment(distribution: TritonDistribution) -> dict:
    env = os.environ.copy()
    library_dirs = [str(distribution.libraries)]
    python_libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if python_libdir and soname and (Path(python_libdir) / soname).exists():
        library_dirs.insert(0, python_libdir)  # the stub must embed this interpreter's libpython
    if env.get("LD_LIBRARY_PATH"):
        library_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(library_dirs)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port in TIME_WAIT after a previous server is free for tritonserver too
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel SIGTERM the server when the thread that started it
    dies (Linux ``PR_SET_PDEATHSIG``), so a killed test run leaves no server behind. libc is
    loaded here, in the parent: the hook itself only makes one system call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def log_to_stderr(line: str) -> None:
    print(LOG_PREFIX + line, file=sys.stderr, flush=True)


class TritonServer:
    """One tritonserver process serving ``repo``; ``with TritonServer(repo) as server: ...``.

    The server gets SIGTERM when the thread that started it ends (so a killed test run or CLI
    leaves no server behind): start it from a thread that lives as long as it should."""

    def __init__(self, repo: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, model_control: str = "none",
                 log: Callable[[str], None] | None = log_to_stderr, ready_timeout_s: float = 180.0,
                 exit_timeout_s: int = 10, extra_args: tuple[str, ...] = (), start_attempts: int = 3,
                 endpoint_url: str | None = None, poll_interval_s: int = 15):
        self.store = parse_store_url(str(repo), endpoint_url) if is_store_url(str(repo)) else None
        self.store_status: StoreStatus | None = None  # filled by start() for a store
        self.repo = self.store.triton_url if self.store else Path(repo).resolve()
        if self.store is None and not self.repo.is_dir():
            raise InputError(f"--repo: model repository {self.repo} does not exist; build it with `posterrt repo build`")
        if endpoint_url and self.store is None:
            raise InputError(f"--endpoint-url: only a repository in an object store (s3://...) has an endpoint, "
                             f"got --repo {repo}")
        if model_control not in MODEL_CONTROL_MODES:
            raise InputError(f"--model-control: {model_control!r} is not one of {', '.join(MODEL_CONTROL_MODES)}")
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.model_control = model_control
        self.poll_interval_s = int(poll_interval_s)
        self.log = log
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.start_attempts = max(1, int(start_attempts))
        self.process: subprocess.Popen | None = None
        self.models: list[str] = []  # ready models, filled by start()
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._workdir: Path | None = None
        self._reader: threading.Thread | None = None

    # -- addresses ----------------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        """Where a local client connects: a wildcard bind is reached through loopback."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.client_host}:{self.ports['grpc']}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_tail(self) -> list[str]:
        return list(self._tail)

    # -- life cycle ---------------------------------------------------------------------------
    def command(self, distribution: TritonDistribution, backends: Path) -> list[str]:
        args = [str(distribution.binary), f"--model-repository={self.repo}",
                f"--backend-directory={backends}", f"--cache-directory={distribution.caches}",
                f"--model-control-mode={self.model_control}", "--strict-readiness=true",
                f"--exit-timeout-secs={self.exit_timeout_s}", "--log-verbose=0"]
        if self.model_control == "explicit":
            args.append("--load-model=*")  # explicit mode still starts with every model loaded
        if self.model_control == "poll":
            args.append(f"--repository-poll-secs={self.poll_interval_s}")
        for endpoint, port in self.ports.items():
            args += [f"--{endpoint}-address={self.host}", f"--{endpoint}-port={port}"]
        return args + list(self.extra_args)

    def start(self) -> "TritonServer":
        assert self.process is None, "a TritonServer object starts once"
        distribution = find_tritonserver()
        for endpoint, port in self.ports.items():
            if port_in_use(self.host, port):
                raise BackendError(f"--{endpoint}-port: port {port} on {self.host} is in use "
                                   f"(another server?); choose another port")
        if self.store is not None:
            self.store_status = check_store(self.store)
            if self.store_status.pending and self.log is not None:
                self.log("a push stopped half-way left newer versions that are not served: " + ", ".join(
                    f"{m} v{v} (serving v{self.store_status.live[m]})" for m, v in self.store_status.pending.items())
                    + "; rerun `posterrt repo push` to finish it")
        for attempt in range(1, self.start_attempts + 1):
            self._spawn(distribution)
            try:
                self.wait_ready()
                return self
            except BaseException:
                transient = self.process.poll() is not None and self._aborted_in_event_engine()
                self.stop()
                if not transient or attempt == self.start_attempts:
                    raise
            if self.log is not None:
                self.log(f"tritonserver aborted while starting (gRPC event engine, a known transient crash "
                         f"when clients connect during model loading); starting it again ({attempt + 1} of "
                         f"{self.start_attempts})")
            self.process, self._tail = None, collections.deque(maxlen=self._tail.maxlen)
        raise AssertionError("unreachable")

    def _spawn(self, distribution: TritonDistribution) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="posterrt-triton-"))
        backends = prepare_backend_folder(distribution, self._workdir / "backends")
        try:
            self.process = subprocess.Popen(
                self.command(distribution, backends), env=server_environment(distribution),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self._workdir, start_new_session=True, preexec_fn=_parent_death_signal())
        except OSError as error:
            self._cleanup()
            raise BackendError(f"tritonserver cannot start: {error}") from None
        self._reader = threading.Thread(target=self._forward_log, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _aborted_in_event_engine(self) -> bool:
        """Triton 2.51's gRPC front end sometimes aborts at start ("Epoll1Poller ... epoll_wait error:
        Bad file descriptor", SIGABRT) when clients connect while models load: a restart that
        clients are waiting for is exactly then. Seen about once in 12 starts under a polling
        client, never without one; nothing in the repository is wrong, so starting again is right."""
        self._reader.join(timeout=5)
        return self.process.returncode == -signal.SIGABRT and any("(event_engine)" in line for line in self._tail)

    def _forward_log(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._tail.append(line)
            if self.log is not None and line:
                self.log(line)

    def first_error(self) -> str:
        """The error that explains a failed start, as one line for a user-facing message.

        A model that failed to load explains most; then Triton's ``error:`` summary (ports in use
        are reported there); then any other error line except those every CPU-only start logs.
        """
        errors = []
        for line in self._tail:
            match = _ERROR_LINE.match(line)
            if match:
                # Triton escapes newlines in its log: keep the message, drop the stub's traceback
                errors.append(match.group(1).strip().strip('"').split("\\n")[0].strip())
        summaries = [line[len("error:"):].strip() for line in self._tail if line.startswith("error:")]
        for message in ([e for e in errors if "failed to load" in e] + summaries
                        + [e for e in errors if not any(b in e for b in _BENIGN_ERRORS)]):
            return message
        return f"no error in its log (see the lines prefixed {LOG_PREFIX.strip()})"

    def _get(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        url = f"http://{self.client_host}:{self.ports['http']}{path}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, b""
        except OSError:
            return 0, b""

    def repository_index(self) -> list[dict]:
        status, body = self._get("/v2/repository/index", data=b"{}")
        return json.loads(body) if status == 200 else []

    def wait_ready(self) -> list[str]:
        """Block until the server and every model in the repository are ready; returns the models."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if not self.alive:
                self._reader.join(timeout=5)  # read the log to its end before quoting it
                raise BackendError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                   f"{self.first_error()}")
            status, _ = self._get("/v2/health/ready")
            if status == 200:
                index = self.repository_index()
                if index and all(m.get("state") == "READY" for m in index):
                    self.models = sorted(m["name"] for m in index)
                    return self.models
            if time.monotonic() > deadline:
                raise BackendError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s: {self.first_error()}")
            time.sleep(0.25)

    def stop(self) -> int | None:
        """SIGTERM, wait for Triton's own graceful exit, SIGKILL what is left of its process group."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=self.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            try:  # Python-backend stubs that outlived the server (they normally exit with it)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self._reader is not None:
                self._reader.join(timeout=5)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
