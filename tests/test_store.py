"""`posterrt repo push` to a real local S3 endpoint (moto's server on 127.0.0.1): versioned pushes of
the models that changed, an interrupted push that leaves the live versions serving and resumes, the
checks `posterrt serve` runs on a store, and one-line errors for each thing a user gets wrong."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from posterrt.runtime.errors import InputError, StoreError
from posterrt.runtime.triton import store
from posterrt.runtime.triton.model_config import parse_pbtxt, to_pbtxt
from posterrt.runtime.triton.repository import build_repository
from posterrt.runtime.triton.store import STORE_MANIFEST, check_store, parse_store_url, push_repository

from helpers_store import CREDENTIALS, refusing_credentials, s3_endpoint

MODELS = ["plannet_encoder", "plannet_denoiser"]


@pytest.fixture(scope="module")
def endpoint():
    with s3_endpoint(buckets=("models",)) as url:
        yield url


@pytest.fixture(scope="module")
def built_repo(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "model_repository"
    build_repository(tiny_bundle, out, models=MODELS)
    return out


@pytest.fixture
def repo(built_repo, tmp_path) -> Path:
    """A copy of the built repository this test may edit."""
    out = tmp_path / "model_repository"
    shutil.copytree(built_repo, out)
    return out


def keys(endpoint: str, location) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.prefix + "/")
    return {item["Key"][len(location.prefix) + 1:] for page in pages for item in page.get("Contents", [])}


def change_instances(repo: Path, model: str, count: int) -> None:
    """A new revision of ``model``: its config with another instance count (what a rebuild with
    --model-instances writes)."""
    config = parse_pbtxt((repo / model / "config.pbtxt").read_text())
    config.instance_group[0].count = count
    (repo / model / "config.pbtxt").write_text(to_pbtxt(config))


def test_push_adds_versions_only_for_changed_models_and_keeps_the_previous(repo, endpoint):
    location = parse_store_url("s3://models/versions", endpoint)
    first = push_repository(repo, location, progress=False)
    assert first.changed == {m: (None, 1) for m in MODELS} and first.uploaded_bytes > 0
    stored = keys(endpoint, location)
    assert STORE_MANIFEST in stored
    for model in MODELS:
        assert {f"{model}/config.pbtxt", f"{model}/1/model.onnx", f"{model}/1/model.py"} <= stored
    pinned = parse_pbtxt(boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket="models", Key="versions/plannet_denoiser/config.pbtxt")["Body"].read().decode())
    assert list(pinned.version_policy.specific.versions) == [1]

    again = push_repository(repo, location, progress=False)
    assert again.changed == {} and again.unchanged == {m: 1 for m in MODELS} and again.uploaded_bytes == 0

    change_instances(repo, "plannet_denoiser", 3)
    second = push_repository(repo, location, progress=False)
    assert second.changed == {"plannet_denoiser": (1, 2)} and second.unchanged == {"plannet_encoder": 1}
    assert {"plannet_denoiser/1/model.onnx", "plannet_denoiser/2/model.onnx"} <= keys(endpoint, location)

    change_instances(repo, "plannet_denoiser", 1)
    third = push_repository(repo, location, progress=False)
    assert third.changed == {"plannet_denoiser": (2, 3)} and third.pruned == ["plannet_denoiser/1"]
    stored = keys(endpoint, location)
    assert not any(k.startswith("plannet_denoiser/1/") for k in stored)
    assert {"plannet_denoiser/2/model.onnx", "plannet_denoiser/3/model.onnx"} <= stored
    status = check_store(location)
    assert status.live == {"plannet_denoiser": 3, "plannet_encoder": 1} and status.pending == {}


class DropsAfter:
    """An S3 client whose connection drops after ``uploads`` file uploads (as a network would)."""

    def __init__(self, client, uploads: int):
        self._client, self._left = client, uploads

    def __getattr__(self, name):
        return getattr(self._client, name)

    def upload_file(self, *args, **kwargs):
        from botocore.exceptions import EndpointConnectionError

        if self._left == 0:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1")
        self._left -= 1
        return self._client.upload_file(*args, **kwargs)


def test_interrupted_push_leaves_the_live_version_and_a_rerun_finishes_it(repo, endpoint, monkeypatch):
    location = parse_store_url("s3://models/interrupted", endpoint)
    push_repository(repo, location, progress=False)
    change_instances(repo, "plannet_denoiser", 3)
    real_client = store.store_client
    monkeypatch.setattr(store, "store_client", lambda where: DropsAfter(real_client(where), uploads=1))
    with pytest.raises(StoreError) as stopped:
        push_repository(repo, location, progress=False)
    message = str(stopped.value)
    assert "stopped while uploading" in message and "cannot be reached" in message
    assert "the store still serves plannet_denoiser v1, plannet_encoder v1" in message
    assert f"rerun `posterrt repo push --repo {repo} --to s3://models/interrupted --endpoint-url {endpoint}`" in message
    status = check_store(location)  # what a starting server would load
    assert status.live == {"plannet_denoiser": 1, "plannet_encoder": 1} and status.pending == {"plannet_denoiser": 2}

    monkeypatch.setattr(store, "store_client", real_client)
    rerun = push_repository(repo, location, progress=False)
    assert rerun.changed == {"plannet_denoiser": (1, 2)} and rerun.skipped_files == 1
    assert check_store(location).live["plannet_denoiser"] == 2


def test_serving_checks_name_what_is_wrong_with_the_store(repo, endpoint):
    location = parse_store_url("s3://models/checked", endpoint)
    push_repository(repo, location, progress=False)
    with pytest.raises(StoreError, match=r"s3://models/chekced at .* holds no posterrt repository \(no "
                                         r"posterrt-store.json\).*pushed under s3://models: .*s3://models/checked"):
        check_store(parse_store_url("s3://models/chekced", endpoint))
    boto3.client("s3", endpoint_url=endpoint).delete_object(Bucket="models", Key="checked/plannet_encoder/1/model.onnx")
    with pytest.raises(StoreError, match=r"model plannet_encoder version 1 is incomplete \(plannet_encoder/1/model.onnx "
                                         r"is missing or has another size\); push the repository again"):
        check_store(location)


def test_store_errors_are_one_line_and_name_what_to_fix(repo, endpoint):
    with pytest.raises(StoreError, match="bucket 'nosuchbucket' does not exist at http://127.0.0.1:.*: create it or fix the URL"):
        push_repository(repo, parse_store_url("s3://nosuchbucket/x", endpoint), progress=False)
    with pytest.raises(StoreError, match=r"the store http://127.0.0.1:9 cannot be reached .*check --endpoint-url"):
        check_store(parse_store_url("s3://models/x", "http://127.0.0.1:9"))
    with refusing_credentials():
        with pytest.raises(StoreError, match=r"refused the credentials \(\w+\) while opening the bucket: check "
                                             r"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
            push_repository(repo, parse_store_url("s3://models/x", endpoint), progress=False)
    for url, fragment in (("s3:/models/x", "is not an object-store URL"), ("models/x", "is not an object-store URL"),
                          ("s3://Models/x", "bucket 'Models'"), ("s3://models//x", "has an empty"),
                          ("s3://http://127.0.0.1:9000", "bucket '' ")):
        with pytest.raises(InputError, match=fragment):
            parse_store_url(url)
    with pytest.raises(InputError, match="--endpoint-url: '127.0.0.1:9000' is not an endpoint"):
        parse_store_url("s3://models/x", "127.0.0.1:9000")
    embedded = parse_store_url(f"s3://{endpoint}/models/fleet/v")
    assert (embedded.endpoint_url, embedded.bucket, embedded.prefix) == (endpoint, "models", "fleet/v")
    assert embedded.triton_url == f"s3://{endpoint}/models/fleet/v"


def test_push_command_prints_versions_and_never_the_credentials(repo, endpoint, tmp_path):
    base = [sys.executable, "-m", "posterrt.runtime.cli", "repo", "push", "--repo", str(repo), "--endpoint-url", endpoint]
    done = subprocess.run(base + ["--to", "s3://models/cli", "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "plannet_denoiser       v1 (new)" in done.stdout and "pushed 2 of 2 models to s3://models/cli" in done.stdout
    assert "posterrt repo reload --servers URL,... --repo s3://models/cli" in done.stdout
    failed = subprocess.run(base + ["--to", "s3://absent-bucket/cli", "--quiet"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: bucket 'absent-bucket' does not exist at {endpoint}: create it or fix the URL"]
    for output in (done.stdout, done.stderr, failed.stdout, failed.stderr):
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in output and CREDENTIALS["AWS_ACCESS_KEY_ID"] not in output
    reload = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "repo", "reload", "--servers", "ftp://host:1",
                             "--models", "plannet_denoiser"], capture_output=True, text=True, timeout=120)
    assert reload.returncode == 2 and reload.stderr.strip().splitlines() == [
        "error: --servers: 'ftp://host:1' is not a Triton URL; expected http://HOST:PORT or grpc://HOST:PORT"]
    manifest = json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket="models", Key=f"cli/{STORE_MANIFEST}")["Body"].read())
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)


def test_large_files_go_up_in_parts_and_a_rerun_recognizes_them(built_repo, endpoint, tmp_path, monkeypatch):
    repo = tmp_path / "model_repository"
    shutil.copytree(built_repo / "plannet_encoder", repo / "plannet_encoder")
    big = repo / "plannet_encoder" / "1" / "weights.bin"
    big.write_bytes(os.urandom(11 << 20))
    monkeypatch.setattr(store, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part: three parts for 11 MB
    location = parse_store_url("s3://models/multipart", endpoint)
    first = push_repository(repo, location, progress=False)
    head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket="models", Key="multipart/plannet_encoder/1/weights.bin")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == 11 << 20
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert first.uploaded_bytes >= 11 << 20
    s3 = boto3.client("s3", endpoint_url=endpoint)  # as if the push had stopped before its switch
    s3.delete_object(Bucket="models", Key=f"multipart/{STORE_MANIFEST}")
    again = push_repository(repo, location, progress=False)
    assert again.skipped_files == len(list((repo / "plannet_encoder" / "1").iterdir())) and again.uploaded_bytes == 0
