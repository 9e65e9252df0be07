"""`posterrt deploy k8s`: Kubernetes manifests for a Triton fleet serving a repository from an object store."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..kubernetes import MODEL_CONTROL
from ..triton.model_config import FLAVORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    k8s = sub.add_parser("k8s", help="Deployment, Service, HPA, PodDisruptionBudget, Secret template, "
                                     "prometheus-adapter rule, KServe alternative")
    k8s.add_argument("--repo", required=True, metavar="s3://BUCKET/PREFIX", help="the store `posterrt repo push` wrote")
    k8s.add_argument("--endpoint-url", help="an S3-compatible store reachable from the cluster: http://HOST:PORT")
    k8s.add_argument("--flavor", choices=FLAVORS, default="cpu", help="the repository's flavor (default cpu)")
    k8s.add_argument("--out", default="deploy", help="folder for the manifests (default deploy/)")
    k8s.add_argument("--name", default="posterrt-triton", help="name of the Deployment, Service, ... (default posterrt-triton)")
    k8s.add_argument("--namespace", help="namespace (default: the one kubectl uses)")
    k8s.add_argument("--image", help="tritonserver image (default: the flavor's; cpu: build deploy/image/Dockerfile)")
    k8s.add_argument("--replicas", type=int, default=2, help="minimum replicas (default 2)")
    k8s.add_argument("--max-replicas", type=int, default=8, help="maximum replicas the autoscaler may reach (default 8)")
    k8s.add_argument("--target-queue-ms", type=float, default=100.0,
                     help="the autoscaler adds pods while a request waits longer than this in Triton's queues, "
                          "averaged over pods (default 100)")
    k8s.add_argument("--model-control", choices=MODEL_CONTROL, default="explicit",
                     help="explicit (default): a push goes live with `kubectl rollout restart`; poll: each pod "
                          "reloads changed models itself")
    k8s.add_argument("--region", default="us-east-1", help="AWS_DEFAULT_REGION of the pods (default us-east-1)")


def run(args: argparse.Namespace) -> int:
    from ..kubernetes import Deployment, write_manifests
    from ..triton.store import parse_store_url

    spec = Deployment(parse_store_url(args.repo, args.endpoint_url), flavor=args.flavor, name=args.name,
                      namespace=args.namespace, image=args.image, replicas=args.replicas,
                      max_replicas=args.max_replicas, target_queue_ms=args.target_queue_ms,
                      model_control=args.model_control, region=args.region)
    command = "posterrt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["deploy"] \
        else "posterrt deploy k8s"
    for path in write_manifests(spec, args.out, command):
        print(path)
    print(f"apply: envsubst < {args.out}/secret/store-credentials.yaml | kubectl apply -f - && kubectl apply -f {args.out}/")
    return 0
