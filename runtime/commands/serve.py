"""`posterrt serve`: run the nvidia-pytriton wheel's tritonserver on a model repository until Ctrl-C / SIGTERM."""
from __future__ import annotations

import argparse
import signal
import threading

from ..triton.server import MODEL_CONTROL_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default="model_repository",
                        help="repository from `posterrt repo build`, or s3://BUCKET/PREFIX from `posterrt repo push` "
                             "(credentials from the AWS environment or profile)")
    parser.add_argument("--endpoint-url", help="an S3-compatible store (MinIO, ...): http://HOST:PORT (default: AWS S3)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 to expose it)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    parser.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default="none",
                        help="none: the repository is fixed (default); explicit: models may be loaded/unloaded "
                             "through the API (every model is loaded at start; `posterrt repo reload` rolls a push "
                             "out); poll: the server reloads the models whose files changed every --poll-interval s")
    parser.add_argument("--poll-interval", type=int, default=15, help="seconds between polls (--model-control poll)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every model (default 300)")
    parser.add_argument("--quiet", action="store_true", help="do not forward the server's log")


def run(args: argparse.Namespace) -> int:
    from ..errors import BackendError
    from ..triton.server import TritonServer, log_to_stderr

    stop = threading.Event()
    # SIGTERM (docker stop, systemd) ends the wait like Ctrl-C does; the server is then stopped
    # gracefully by TritonServer.__exit__.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = TritonServer(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, model_control=args.model_control,
                          ready_timeout_s=args.ready_timeout, log=None if args.quiet else log_to_stderr,
                          endpoint_url=args.endpoint_url, poll_interval_s=args.poll_interval)
    with server:
        source = f" from {server.store.url}" if server.store else ""
        print(f"serving {len(server.models)} models ({', '.join(server.models)}){source} at {server.http_url} and "
              f"{server.grpc_url}; metrics at http://{server.client_host}:{args.metrics_port}/metrics; "
              f"Ctrl-C to stop", flush=True)
        try:
            while not stop.wait(0.5):
                if not server.alive:
                    raise BackendError(f"tritonserver exited with code {server.process.returncode}: "
                                       f"{server.first_error()}")
        except KeyboardInterrupt:
            pass
        print("stopping tritonserver", flush=True)
    return 0
