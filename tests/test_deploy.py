"""`posterrt deploy k8s`: every generated manifest validates offline against the Kubernetes schemas
(kubernetes-validate --strict, the schemas of Kubernetes 1.30), the KServe InferenceService passes
a structural check of the fields its CRD defines, and a broken field is caught by both."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from posterrt.runtime.errors import InputError
from posterrt.runtime.kubernetes import POD_METRIC, QUEUE_METRIC, SUCCESS_METRIC, Deployment, write_manifests
from posterrt.runtime.triton.model_config import FLAVORS
from posterrt.runtime.triton.store import parse_store_url

KUBERNETES = "1.30"
STORE = parse_store_url("s3://models/posters", "http://minio.storage:9000")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def generated(tmp_path: Path, flavor: str) -> dict[str, list[dict]]:
    out = tmp_path / flavor
    files = write_manifests(Deployment(STORE, flavor=flavor, namespace="posters"), out)
    return {p.relative_to(out).as_posix(): documents(p) for p in files if p.suffix == ".yaml"}


def by_kind(manifests: dict[str, list[dict]]) -> dict[str, dict]:
    return {d["kind"]: d for docs in manifests.values() for d in docs if "kind" in d}


# The fields of serving.kserve.io/v1beta1 InferenceService that the generator may write, as nested
# allowed keys (from KServe's CRD: predictor = ComponentExtensionSpec + PodSpec + model: ModelSpec,
# itself a Container plus modelFormat/runtime/storageUri). None: a leaf, checked by its own rule.
KSERVE_FIELDS = {"apiVersion": None, "kind": None, "metadata": {"name": None, "namespace": None, "labels": None,
                                                                "annotations": None},
                 "spec": {"predictor": {"minReplicas": None, "maxReplicas": None, "serviceAccountName": None,
                                        "model": {"modelFormat": {"name": None, "version": None}, "runtime": None,
                                                  "storageUri": None, "args": None, "image": None,
                                                  "resources": {"requests": None, "limits": None}}}}}


def check_inference_service(doc: dict, allowed=KSERVE_FIELDS, where: str = "") -> None:
    """Unknown fields fail (as --strict does for the core kinds), then the values KServe requires."""
    for key, value in doc.items():
        if key not in allowed:
            raise ValueError(f"InferenceService: unknown field {where}{key}")
        if isinstance(allowed[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"InferenceService: {where}{key} must be a mapping")
            check_inference_service(value, allowed[key], f"{where}{key}.")
    if where:
        return
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", doc["metadata"]["name"]):
        raise ValueError("InferenceService: metadata.name is not a DNS-1035 label")
    model = doc["spec"]["predictor"]["model"]
    if model.get("modelFormat", {}).get("name") != "triton" or not str(model.get("storageUri", "")).startswith("s3://"):
        raise ValueError("InferenceService: spec.predictor.model needs modelFormat.name triton and an s3:// storageUri")
    predictor = doc["spec"]["predictor"]
    if not 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]:
        raise ValueError("InferenceService: minReplicas must be 1..maxReplicas")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_manifest_validates_strictly(tmp_path, flavor):
    manifests = generated(tmp_path, flavor)
    for name, docs in manifests.items():
        if name.startswith("prometheus-adapter/"):
            continue  # helm values, checked below
        for doc in docs:
            if doc["kind"] == "InferenceService":
                check_inference_service(doc)
            else:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = by_kind(manifests)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "ServiceAccount",
            "InferenceService"} <= set(kinds)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--model-repository=s3://http://minio.storage:9000/models/posters" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "paper models need minutes to load"
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (flavor != "cpu")
    assert {p["name"] for p in kinds["Service"]["spec"]["ports"]} == {"http", "grpc", "metrics"}
    assert (Path(tmp_path / flavor / "image" / "Dockerfile").exists()) == (flavor == "cpu")


def test_autoscaler_metric_is_the_one_the_adapter_rule_serves(tmp_path):
    manifests = generated(tmp_path, "cpu")
    hpa = by_kind(manifests)["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == POD_METRIC
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "100000"}  # 100 ms in us
    (rule,) = manifests["prometheus-adapter/values.yaml"][0]["rules"]["custom"]
    assert rule["name"]["as"] == POD_METRIC and re.match(rule["name"]["matches"], QUEUE_METRIC)
    assert QUEUE_METRIC in rule["metricsQuery"] and SUCCESS_METRIC in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    secret = by_kind(manifests)["Secret"]
    assert set(secret["stringData"].values()) == {"${AWS_ACCESS_KEY_ID}", "${AWS_SECRET_ACCESS_KEY}"}


def test_a_broken_field_is_caught(tmp_path):
    kinds = by_kind(generated(tmp_path, "gpu-trt"))
    typo = copy.deepcopy(kinds["Deployment"])
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = typo["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(typo, KUBERNETES, strict=True)
    wrong_type = copy.deepcopy(kinds["HorizontalPodAutoscaler"])
    wrong_type["spec"]["maxReplicas"] = "eight"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES, strict=True)
    inference = copy.deepcopy(kinds["InferenceService"])
    inference["spec"]["predictor"]["model"]["storageURI"] = inference["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(ValueError, match="unknown field spec.predictor.model.storageURI"):
        check_inference_service(inference)


def test_deploy_command_and_its_errors(tmp_path):
    base = [sys.executable, "-m", "posterrt.runtime.cli", "deploy", "k8s", "--out", str(tmp_path / "deploy")]
    done = subprocess.run(base + ["--repo", "s3://models/posters", "--flavor", "gpu-onnx"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "kubectl apply -f" in done.stdout
    assert "--flavor gpu-onnx" in (tmp_path / "deploy" / "deployment.yaml").read_text().splitlines()[0]
    failed = subprocess.run(base + ["--repo", "s3:/models/posters"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        "error: --repo: 's3:/models/posters' is not an object-store URL; expected s3://BUCKET/PREFIX "
        "(or s3://http://HOST:PORT/BUCKET/PREFIX)"]
    with pytest.raises(InputError, match="--name: 'Posters' is not a Kubernetes name"):
        Deployment(STORE, name="Posters")
    with pytest.raises(InputError, match=r"--replicas: got 9, expected 1..--max-replicas \(8\)"):
        Deployment(STORE, replicas=9)
