"""`posterrt repo push` and `posterrt repo reload`: a repository in an object store, rolled out to a fleet.

Credentials come from the standard AWS environment or profile only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_DEFAULT_REGION): there is no flag for them, so they never
land in shell history or process lists.
"""
from __future__ import annotations

import argparse


def add_arguments(sub) -> None:
    push = sub.add_parser("push", help="upload a built repository to s3://BUCKET/PREFIX as new versions of the "
                                       "models that changed")
    push.add_argument("--repo", required=True, help="repository folder from `posterrt repo build`")
    push.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX", help="where in the object store")
    push.add_argument("--endpoint-url", help="an S3-compatible store (MinIO, Ceph, ...): http://HOST:PORT "
                                             "(default: AWS S3)")
    push.add_argument("--quiet", action="store_true", help="no progress bars")

    reload = sub.add_parser("reload", help="roll the store's live versions out to running servers "
                                           "(--model-control explicit), one server at a time")
    reload.add_argument("--servers", required=True, metavar="URL,...",
                        help="the servers: http://HOST:PORT or grpc://HOST:PORT, comma-separated")
    which = reload.add_mutually_exclusive_group(required=True)
    which.add_argument("--repo", metavar="s3://BUCKET/PREFIX",
                       help="reload the models whose served version differs from this store's live version")
    which.add_argument("--models", help="comma-separated models to reload whatever their version")
    reload.add_argument("--endpoint-url", help="the store's endpoint, as for push")
    reload.add_argument("--timeout", type=float, default=600.0, help="seconds one model may take to load (default 600)")


def run_push(args: argparse.Namespace) -> int:
    from ..triton.store import parse_store_url, push_repository

    location = parse_store_url(args.to, args.endpoint_url, flag="--to")
    report = push_repository(args.repo, location, progress=not args.quiet)
    for name, (old, new) in sorted(report.changed.items()):
        print(f"{name:22s} v{old} -> v{new}" if old else f"{name:22s} v{new} (new)")
    for name, version in sorted(report.unchanged.items()):
        print(f"{name:22s} v{version} unchanged")
    skipped = f", {report.skipped_files} files already there" if report.skipped_files else ""
    print(f"pushed {len(report.changed)} of {len(report.changed) + len(report.unchanged)} models to {location.url} "
          f"({report.uploaded_bytes / 1e6:.1f} MB{skipped})")
    if report.pruned:
        print(f"removed versions older than the previous one: {', '.join(report.pruned)}")
    if report.changed:
        endpoint = f" --endpoint-url {location.endpoint_url}" if location.endpoint_url else ""
        print(f"servers started from now on serve the new versions; running servers load them with "
              f"`posterrt repo reload --servers URL,... --repo {location.url}{endpoint}` (explicit model control) "
              f"or at their next poll (--model-control poll)")
    return 0


def run_reload(args: argparse.Namespace) -> int:
    from ..backends.triton import parse_urls
    from ..triton.model_control import rolling_reload
    from ..triton.store import check_store, parse_store_url

    servers = parse_urls(args.servers, flag="--servers")
    live, models = None, None
    if args.repo:
        live = check_store(parse_store_url(args.repo, args.endpoint_url)).live
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    rolling_reload(servers, live, models, timeout_s=args.timeout)
    return 0
