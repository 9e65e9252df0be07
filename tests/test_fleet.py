"""A fleet on this machine with the real components: the tiny bundle's repository pushed to a local
S3 endpoint (moto's server), two tritonservers serving straight from it (explicit model control),
clients spreading over both. Every pipeline matches the embedded backend; a new model version
pushed and rolled out under a steady request stream fails no request and later answers come from
it; a server killed mid-run loses no request; a server polling the store serves the live version
past a stopped push and loads the finished one. Tests run in file order: the kill test ends the
fleet's two servers, later tests start their own."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.backends.triton import TritonBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.errors import BackendError
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.triton import store
from posterrt.runtime.triton.repository import build_repository
from posterrt.runtime.triton.store import check_store, parse_store_url, push_repository

from helpers_store import s3_endpoint
from helpers_triton import LogBuffer, free_ports, start_server
from test_store import DropsAfter, change_instances
from test_triton_server import assert_close, assert_same_poster, poster_request

pytestmark = pytest.mark.triton
STEP_MODEL = "plannet_denoiser"  # the model the rollout changes: small, called once per PlanNet step


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


@pytest.fixture(scope="module")
def endpoint():
    with s3_endpoint(buckets=("models",)) as url:
        yield url


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fleet") / "model_repository"
    build_repository(bundle, out)
    return out


@pytest.fixture(scope="module")
def location(repo, endpoint):
    where = parse_store_url("s3://models/fleet", endpoint)
    push_repository(repo, where, progress=False)
    return where


@pytest.fixture(scope="module")
def fleet(location):
    servers = []
    try:
        for _ in range(2):
            servers.append(start_server(location.url, endpoint_url=location.endpoint_url, model_control="explicit"))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def reference(bundle):
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        yield backend


def step_inputs(bundle, count: int, seed: int = 0) -> list[dict]:
    return [sample_inputs(bundle.contract(STEP_MODEL), default_sizes("small"), seed + i) for i in range(count)]


def test_serve_from_a_store_with_a_typo_is_one_line(location):
    (http, grpc, metrics) = free_ports(3)
    done = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "serve", "--repo", "s3://models/flet",
                           "--endpoint-url", location.endpoint_url, "--http-port", str(http), "--grpc-port", str(grpc),
                           "--metrics-port", str(metrics)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3://models/flet at http://127.0.0.1:" in done.stderr and "holds no posterrt repository" in done.stderr
    assert "pushed under s3://models: s3://models/fleet" in done.stderr


def test_every_pipeline_through_the_fleet_equals_embedded(fleet, location, tiny_bundle):
    from posterrt.runtime.client import PosterClient
    from posterrt.runtime.pipelines import PIPELINES

    assert all(server.store_status.live == check_store(location).live for server in fleet)
    urls = f"{fleet[0].grpc_url},{fleet[1].http_url}"
    with PosterClient(tiny_bundle, intra_op_threads=1) as embedded, PosterClient(tiny_bundle, urls) as client:
        for name in PIPELINES:
            want = embedded.generate(poster_request(seed=11), pipeline=name)
            assert_same_poster(client.generate(poster_request(seed=11), pipeline=name), want, f"fleet {name}")
        answered = [server.answered for server in client.backend.servers]
    assert all(count > 0 for count in answered), f"requests per server {answered}: the client should use both"


def test_new_version_rolls_out_under_load_without_a_failed_request(fleet, location, repo, bundle, reference,
                                                                   monkeypatch, tmp_path):
    revised = tmp_path / "model_repository"
    shutil.copytree(repo, revised)
    change_instances(revised, STEP_MODEL, 1)  # the new revision: one instance instead of two
    # a push stopped half-way first: the store and both servers keep serving version 1
    real_client = store.store_client
    monkeypatch.setattr(store, "store_client", lambda where: DropsAfter(real_client(where), uploads=1))
    with pytest.raises(Exception, match="the store still serves"):
        push_repository(revised, location, progress=False)
    monkeypatch.setattr(store, "store_client", real_client)
    assert check_store(location).pending == {STEP_MODEL: 2}

    requests = step_inputs(bundle, 6, seed=40)
    expected = [reference.run(STEP_MODEL, r) for r in requests]
    failures, answers, stop = [], [], threading.Event()
    servers = [server.grpc_url for server in fleet]
    reload = [sys.executable, "-m", "posterrt.runtime.cli", "repo", "reload", "--servers", ",".join(servers),
              "--repo", location.url, "--endpoint-url", location.endpoint_url]
    with TritonBackend(bundle, [fleet[0].http_url, fleet[1].grpc_url], models=[STEP_MODEL], backoff_s=0.05) as backend:
        def stream(worker: int):
            count = 0
            while not stop.is_set():
                index = (worker + count) % len(requests)
                try:
                    assert_close(backend.run(STEP_MODEL, requests[index]), expected[index], f"request {index}")
                    answers.append(index)
                except Exception as error:  # noqa: BLE001 - every failure counts
                    failures.append(repr(error))
                count += 1

        with ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream, worker) for worker in range(2)]
            try:
                time.sleep(0.5)
                unchanged = subprocess.run(reload, capture_output=True, text=True, timeout=300)
                assert unchanged.returncode == 0 and unchanged.stdout.count("already serves the store's versions") == 2
                push_repository(revised, location, progress=False)  # the rerun finishes version 2
                rolled = subprocess.run(reload, capture_output=True, text=True, timeout=300)
                assert rolled.returncode == 0, rolled.stderr
                assert rolled.stdout.count(f"reloaded {STEP_MODEL} v1 -> v2") == 2, rolled.stdout
                before_switch = sum(s.answered_versions[(STEP_MODEL, "1")] for s in backend.servers)
                switched_at = len(answers)
                while len(answers) < switched_at + 20 and not failures:
                    time.sleep(0.05)
            finally:
                stop.set()
                for future in streams:
                    future.result()
        assert failures == [], f"{len(failures)} failed requests during the rollout: {failures[:3]}"
        after_v1 = sum(s.answered_versions[(STEP_MODEL, "1")] for s in backend.servers)
        v2 = sum(s.answered_versions[(STEP_MODEL, "2")] for s in backend.servers)
        assert after_v1 <= before_switch + 2, "version 1 kept answering after both servers switched"  # in flight at the swap
        assert v2 >= 20 and all((STEP_MODEL, "2") in s.verified for s in backend.servers)
    assert all(server.repository_index() and {m["name"]: m["version"] for m in server.repository_index()
                                              if m["state"] == "READY"}[STEP_MODEL] == "2" for server in fleet)


def test_a_version_that_fails_to_load_leaves_the_served_one_serving(fleet, location, repo, bundle, reference, tmp_path):
    broken = tmp_path / "model_repository"
    shutil.copytree(repo / STEP_MODEL, broken / STEP_MODEL)
    change_instances(broken, STEP_MODEL, 2)  # a new revision (v3) ...
    model_file = broken / STEP_MODEL / "1" / "model.onnx"
    model_file.unlink()
    model_file.write_bytes(b"not an onnx file")  # ... whose weights are corrupt
    assert push_repository(broken, location, progress=False).changed == {STEP_MODEL: (2, 3)}
    done = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "repo", "reload", "--servers", fleet[0].http_url,
                           "--repo", location.url, "--endpoint-url", location.endpoint_url],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"could not load model '{STEP_MODEL}'" in done.stderr and "it still serves version 2" in done.stderr
    (request,) = step_inputs(bundle, 1, seed=70)
    with TritonBackend(bundle, fleet[0].http_url, models=[STEP_MODEL]) as backend:
        assert_close(backend.run(STEP_MODEL, request), reference.run(STEP_MODEL, request), "after the failed load")
        assert backend.servers[0].answered_versions == {(STEP_MODEL, "2"): 1}


def test_a_server_killed_mid_run_loses_no_request(fleet, bundle, reference):
    requests = step_inputs(bundle, 60, seed=100)
    expected = [reference.run(STEP_MODEL, r) for r in requests]
    done = []
    with TritonBackend(bundle, [fleet[0].grpc_url, fleet[1].http_url], models=[STEP_MODEL], backoff_s=0.05,
                       timeout_s=20) as backend:
        def call(index):
            result = backend.run(STEP_MODEL, requests[index])
            done.append(index)
            if len(done) == 15:
                fleet[0].process.kill()  # SIGKILL: no graceful drain
            return result

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(call, range(len(requests))))
        for i, (got, want) in enumerate(zip(results, expected)):
            assert_close(got, want, f"request {i}")
        killed, survivor = backend.servers
        assert killed.answered + survivor.answered == len(requests) and killed.answered >= 1
        assert killed.down_since is not None and survivor.answered > len(requests) // 2
        fleet[1].stop()
        with pytest.raises(BackendError, match=r"model 'plannet_denoiser': no Triton server answered .* over "
                                               r"\['grpc://127.0.0.1:\d+', 'http://127.0.0.1:\d+'\]"):
            backend.run(STEP_MODEL, requests[0])


def test_poll_mode_serves_the_live_version_past_a_stopped_push_and_picks_up_the_finished_one(endpoint, repo, tmp_path,
                                                                                               monkeypatch):
    single = tmp_path / "single"
    shutil.copytree(repo / STEP_MODEL, single / STEP_MODEL)
    where = parse_store_url("s3://models/polled", endpoint)
    push_repository(single, where, progress=False)
    change_instances(single, STEP_MODEL, 1)
    real_client = store.store_client
    monkeypatch.setattr(store, "store_client", lambda location: DropsAfter(real_client(location), uploads=1))
    with pytest.raises(Exception, match="the store still serves plannet_denoiser v1"):
        push_repository(single, where, progress=False)
    monkeypatch.setattr(store, "store_client", real_client)
    log = LogBuffer()
    server = start_server(where.url, endpoint_url=endpoint, model_control="poll", poll_interval_s=1, log=log)
    try:
        assert "a push stopped half-way left newer versions that are not served: plannet_denoiser v2 (serving v1)" \
            in log.text()
        assert [(m["name"], m["version"]) for m in server.repository_index() if m["state"] == "READY"] == [(STEP_MODEL, "1")]
        push_repository(single, where, progress=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = {m["version"] for m in server.repository_index() if m["state"] == "READY"}
            if ready == {"2"}:
                break
            time.sleep(0.5)
        assert ready == {"2"}, f"the server did not load version 2 at its polls: {server.repository_index()}"
    finally:
        server.stop()
