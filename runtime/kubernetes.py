"""Kubernetes manifests for a Triton fleet serving a repository from an object store (`posterrt deploy k8s`).

What ``write_manifests`` writes under ``out/`` (``kubectl apply -f out/`` applies the top level):

* ``deployment.yaml``: tritonserver reading ``s3://...`` itself, probes on Triton's health
  endpoints (a startup probe long enough for paper models to download and load), resources,
  ``nvidia.com/gpu`` for the GPU flavors, a memory-backed ``/dev/shm`` (Python-backend stubs
  exchange tensors there; a container's default 64 MB is too small), Prometheus scrape annotations;
* ``service.yaml``: HTTP, gRPC and metrics ports;
* ``hpa.yaml``: ``autoscaling/v2`` on a per-pod queue time, Triton's ``nv_inference_queue_duration_us``
  over ``nv_inference_request_success`` as prometheus-adapter serves it;
* ``pdb.yaml``: at most one pod down at a time by voluntary disruption;
* ``prometheus-adapter/values.yaml``: the adapter rule that makes the HPA's metric (helm values);
* ``secret/store-credentials.yaml``: a Secret template with ``${AWS_...}`` placeholders (filled in by
  ``envsubst`` at apply time: no credential is ever written here);
* ``kserve/inferenceservice.yaml``: the KServe alternative on its Triton runtime;
* ``image/Dockerfile`` (cpu flavor): Triton plus posterrt, which its Python-backend models import.

No cluster is needed to generate them; tests validate them offline (kubernetes-validate --strict).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .triton.model_config import FLAVORS
from .triton.store import StoreLocation

#: Triton 2.51, the release of the nvidia-pytriton wheel posterrt serves and tests with. TensorRT
#: plans must be built with this image's TensorRT (10.5).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
QUEUE_METRIC = "nv_inference_queue_duration_us"  # cumulative queue time, per model
SUCCESS_METRIC = "nv_inference_request_success"  # cumulative successful requests, per model
POD_METRIC = "triton_queue_us_per_request"  # what the adapter serves the HPA, per pod
EXIT_TIMEOUT_S = 30  # Triton finishes in-flight requests this long after SIGTERM
MODEL_CONTROL = ("explicit", "poll")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")


@dataclass(frozen=True)
class Sizing:
    """A starting point per flavor for the paper models, to be refined with benchmarks/capacity.py."""

    image: str
    cpu: str
    memory: str
    gpus: int
    startup_minutes: int  # download + load (+ TensorRT builds for gpu-onnx) before the pod is live


SIZING = {
    "cpu": Sizing("posterrt-triton:0.1.0", cpu="8", memory="24Gi", gpus=0, startup_minutes=15),
    "gpu-onnx": Sizing(TRITON_IMAGE, cpu="4", memory="32Gi", gpus=1, startup_minutes=30),
    "gpu-trt": Sizing(TRITON_IMAGE, cpu="4", memory="24Gi", gpus=1, startup_minutes=10),
}


@dataclass(frozen=True)
class Deployment:
    store: StoreLocation
    flavor: str = "cpu"
    name: str = "posterrt-triton"
    namespace: str | None = None
    image: str | None = None  # default: SIZING[flavor].image
    replicas: int = 2
    max_replicas: int = 8
    target_queue_ms: float = 100.0
    model_control: str = "explicit"
    poll_interval_s: int = 60
    region: str = "us-east-1"

    def __post_init__(self):
        if self.flavor not in FLAVORS:
            raise InputError(f"--flavor: {self.flavor!r} is not one of {', '.join(FLAVORS)}")
        if not _NAME.match(self.name):
            raise InputError(f"--name: {self.name!r} is not a Kubernetes name (lowercase letters, digits and '-', "
                             f"starting with a letter, at most 52 characters)")
        if self.namespace is not None and not _NAME.match(self.namespace):
            raise InputError(f"--namespace: {self.namespace!r} is not a Kubernetes name")
        if not 1 <= self.replicas <= self.max_replicas:
            raise InputError(f"--replicas: got {self.replicas}, expected 1..--max-replicas ({self.max_replicas})")
        if not self.target_queue_ms > 0:
            raise InputError(f"--target-queue-ms: got {self.target_queue_ms}, expected a positive number")
        if self.model_control not in MODEL_CONTROL:
            raise InputError(f"--model-control: {self.model_control!r} is not one of {', '.join(MODEL_CONTROL)}")

    @property
    def sizing(self) -> Sizing:
        return SIZING[self.flavor]

    @property
    def labels(self) -> dict:
        return {"app.kubernetes.io/name": "posterrt-triton", "app.kubernetes.io/instance": self.name}

    def metadata(self, name: str | None = None, **extra) -> dict:
        meta = {"name": name or self.name, "labels": dict(self.labels)}
        if self.namespace:
            meta["namespace"] = self.namespace
        return {**meta, **extra}

    @property
    def secret_name(self) -> str:
        return f"{self.name}-store"


def triton_args(spec: Deployment) -> list[str]:
    args = [f"--model-repository={spec.store.triton_url}", f"--model-control-mode={spec.model_control}",
            "--strict-readiness=true", f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
    args += ["--load-model=*"] if spec.model_control == "explicit" else [f"--repository-poll-secs={spec.poll_interval_s}"]
    return args + [f"--{endpoint}-port={port}" for endpoint, port in PORTS.items()]


def _resources(spec: Deployment) -> dict:
    sizing = spec.sizing
    resources = {"requests": {"cpu": sizing.cpu, "memory": sizing.memory}, "limits": {"memory": sizing.memory}}
    if sizing.gpus:
        resources["limits"]["nvidia.com/gpu"] = sizing.gpus
    return resources


def _probe(path: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 2,
            "failureThreshold": failures}


def deployment(spec: Deployment) -> dict:
    container = {
        "name": "tritonserver", "image": spec.image or spec.sizing.image, "command": ["tritonserver"],
        "args": triton_args(spec),
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORTS.items()],
        "env": [{"name": "AWS_DEFAULT_REGION", "value": spec.region}],
        "envFrom": [{"secretRef": {"name": spec.secret_name}}],
        # Triton answers /v2/health/live once its endpoints start, which is after the models load:
        # the startup probe allows that long, then liveness takes over.
        "startupProbe": _probe("/v2/health/live", 10, spec.sizing.startup_minutes * 6),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
        "resources": _resources(spec),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "metadata": {"labels": dict(spec.labels), "annotations": {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]), "prometheus.io/path": "/metrics"}},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": EXIT_TIMEOUT_S + 15,
                 "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]},
    }
    if spec.sizing.gpus:
        pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": spec.metadata(),
            "spec": {"replicas": spec.replicas, "selector": {"matchLabels": dict(spec.labels)},
                     # a new pod is ready before an old one goes: a rollout never lowers capacity
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": pod}}


def service(spec: Deployment) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": spec.metadata(),
            "spec": {"type": "ClusterIP", "selector": dict(spec.labels),
                     "ports": [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                               for name, port in PORTS.items()]}}


def autoscaler(spec: Deployment) -> dict:
    target_us = int(spec.target_queue_ms * 1000)
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": spec.metadata(),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas,
                     "metrics": [{"type": "Pods", "pods": {"metric": {"name": POD_METRIC},
                                                           "target": {"type": "AverageValue",
                                                                      "averageValue": str(target_us)}}}],
                     # pods take minutes to load: add one at a time, remove slowly so load spikes do not flap
                     "behavior": {"scaleUp": {"stabilizationWindowSeconds": 60,
                                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
                                  "scaleDown": {"stabilizationWindowSeconds": 600,
                                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}}}}


def disruption_budget(spec: Deployment) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": spec.metadata(),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(spec.labels)}}}


def store_secret(spec: Deployment) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": spec.metadata(spec.secret_name), "type": "Opaque",
            "stringData": {"AWS_ACCESS_KEY_ID": "${AWS_ACCESS_KEY_ID}",
                           "AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}"}}


def adapter_rule() -> dict:
    """prometheus-adapter's rule: per pod, queue time per successful request over the last minute (us)."""
    query = (f"sum by (<<.GroupBy>>) (rate({QUEUE_METRIC}{{<<.LabelMatchers>>}}[1m])) / "
             f"clamp_min(sum by (<<.GroupBy>>) (rate({SUCCESS_METRIC}{{<<.LabelMatchers>>}}[1m])), 0.001)")
    return {"seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": f"^{QUEUE_METRIC}$", "as": POD_METRIC}, "metricsQuery": query}


def kserve_service(spec: Deployment) -> list[dict]:
    """KServe's alternative: an InferenceService on the ``kserve-tritonserver`` runtime; KServe's
    storage initializer copies the store's prefix into the pod (credentials: a Secret annotated
    with the endpoint and a ServiceAccount naming it, as KServe documents)."""
    account = f"{spec.name}-kserve"
    secret = store_secret(spec)
    secret["metadata"]["name"] = f"{spec.name}-kserve-store"
    if spec.store.endpoint_url:
        scheme, _, host = spec.store.endpoint_url.partition("://")
        secret["metadata"]["annotations"] = {"serving.kserve.io/s3-endpoint": host,
                                             "serving.kserve.io/s3-usehttps": "1" if scheme == "https" else "0",
                                             "serving.kserve.io/s3-region": spec.region}
    model = {"modelFormat": {"name": "triton"}, "runtime": "kserve-tritonserver", "storageUri": spec.store.url,
             "args": ["--strict-readiness=true", f"--exit-timeout-secs={EXIT_TIMEOUT_S}"],
             "resources": _resources(spec)}
    if spec.flavor == "cpu":
        model["image"] = spec.image or spec.sizing.image  # Triton with posterrt for the Python-backend models
    inference = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": spec.metadata(),
                 "spec": {"predictor": {"minReplicas": spec.replicas, "maxReplicas": spec.max_replicas,
                                        "serviceAccountName": account, "model": model}}}
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": spec.metadata(account),
                       "secrets": [{"name": secret["metadata"]["name"]}]}
    return [secret, service_account, inference]


DOCKERFILE = f"""# The cpu flavor's image: Triton with the Python backend, plus posterrt (numpy, ONNX Runtime,
# OpenVINO) that its Python-backend models import in the stub's Python. Build it from a posterrt
# checkout: docker build -f deploy/image/Dockerfile -t posterrt-triton:0.1.0 .
FROM {TRITON_IMAGE}
COPY . /src/posterrt
RUN pip install --no-cache-dir "/src/posterrt[openvino]" && rm -rf /src/posterrt
"""


def write_manifests(spec: Deployment, out: str | Path, command: str = "posterrt deploy k8s") -> list[Path]:
    """Write every manifest under ``out``; returns the files written."""
    import yaml

    root = Path(out)
    header = f"# Generated by `{command}`; edit the command's flags rather than this file.\n"
    files = {
        "deployment.yaml": [deployment(spec)], "service.yaml": [service(spec)], "hpa.yaml": [autoscaler(spec)],
        "pdb.yaml": [disruption_budget(spec)], "secret/store-credentials.yaml": [store_secret(spec)],
        "kserve/inferenceservice.yaml": kserve_service(spec),
        "prometheus-adapter/values.yaml": [{"rules": {"custom": [adapter_rule()]}}],
    }
    written = []
    for relative, documents in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump_all(documents, sort_keys=False, width=120))
        written.append(path)
    if spec.flavor == "cpu":
        path = root / "image" / "Dockerfile"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DOCKERFILE)
        written.append(path)
    return written
