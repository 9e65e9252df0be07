"""A real tritonserver (the nvidia-pytriton wheel's) on 127.0.0.1 serving the tiny bundle's cpu
repository: parity with ONNX Runtime in-process over HTTP and gRPC, dynamic batching under
concurrent load, failover between two servers, refusal of malformed requests, start-up errors, and
the `posterrt serve` command. One server is started for the module; the failover, error and CLI
tests start short-lived extra ones."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from posterrt.runtime.backends import open_backend
from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.backends.triton import TritonBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.errors import BackendError, ContractError, InputError
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.triton.repository import build_repository, write_client_bundle
from posterrt.runtime.triton.server import TritonServer

from helpers_triton import free_ports, start_server

pytestmark = pytest.mark.triton

#: Triton must return what ONNX Runtime in-process returns: same ONNX file, same library; the
#: only freedom is the thread count (1 in the server), which may reorder float sums.
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    """The shared tiny bundle (all twelve models, exported once per session); POSTERRT_TEST_BUNDLE
    names an already exported one instead, to iterate on these tests without exporting."""
    reuse = os.environ.get("POSTERRT_TEST_BUNDLE")
    return Path(reuse) if reuse else request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return Bundle(bundle_dir)


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    build_repository(bundle, out)
    return out


@pytest.fixture(scope="module")
def single_repo(repo, tmp_path_factory) -> Path:
    """A repository with plannet_denoiser alone (hardlinked): for the extra servers, which then start fast."""
    out = tmp_path_factory.mktemp("single") / "model_repository"
    shutil.copytree(repo / "plannet_denoiser", out / "plannet_denoiser", copy_function=os.link)
    return out


@pytest.fixture(scope="module")
def server(repo):
    server = start_server(repo)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(bundle):
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        yield backend


def inputs_for(bundle, model, seed, sizes=None):
    return sample_inputs(bundle.contract(model), sizes or default_sizes("other"), seed)


def assert_close(actual: dict, expected: dict, where: str):
    assert actual.keys() == expected.keys(), where
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, f"{where} {name}: {got.shape} vs {want.shape}"
        scale = max(float(np.abs(want).max()), 1e-12)
        diff = float(np.abs(got.astype(np.float64) - want).max())
        assert diff <= REL_TOL * scale, f"{where} {name}: max abs diff {diff:.3e} over scale {scale:.3e}"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_model_matches_onnxruntime(server, bundle, reference, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with open_backend(bundle, url) as backend:
        assert sorted(m for s in backend.servers for m in s.models) == sorted(bundle.models)
        for model in bundle.models:
            inputs = inputs_for(bundle, model, seed=int.from_bytes(os.urandom(2), "little"))
            assert_close(backend.run(model, inputs), reference.run(model, inputs), f"{protocol} {model}")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shared_memory_matches_and_reuses_regions(server, bundle, reference, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    models = [m for m in ("bg_unet", "vae_decoder", "plannet_encoder") if m in bundle.models]
    with TritonBackend(bundle, url, shared_memory=True, shm_threshold_bytes=4096) as backend:
        for round_ in range(2):
            for model in models:
                inputs = inputs_for(bundle, model, seed=round_)
                assert_close(backend.run(model, inputs), reference.run(model, inputs), f"{protocol} shm {model}")
        regions = backend._shm.regions_on(backend.servers[0].url)
        assert regions, "large tensors should have gone through shared memory"
        count = len(regions)
        for model in models:  # the same sizes again: the pool serves them from existing regions
            backend.run(model, inputs_for(bundle, model, seed=7))
        assert len(backend._shm.regions_on(backend.servers[0].url)) == count


def model_stats(url: str, model: str) -> dict:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.split("://")[1])
    try:
        (stats,) = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return stats


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_requests_are_correct_and_batched(server, bundle, reference, protocol):
    model = "plannet_denoiser"  # a step model: dynamic batching is on by default
    url = server.http_url if protocol == "http" else server.grpc_url
    before = model_stats(server.http_url, model)
    requests = [inputs_for(bundle, model, seed=100 + i, sizes=default_sizes("small")) for i in range(48)]
    expected = [reference.run(model, r) for r in requests]
    with TritonBackend(bundle, url, models=[model]) as backend, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: backend.run(model, r), requests))
    for i, (got, want) in enumerate(zip(results, expected)):
        assert_close(got, want, f"{protocol} request {i}")
    assert [s.failures for s in backend.servers] == [0], backend.servers[0].last_error
    after = model_stats(server.http_url, model)
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == len(requests)
    assert executions < inferences, f"no request was batched ({executions} executions for {inferences} inferences)"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_are_refused_and_the_server_keeps_serving(server, bundle, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    module = httpclient if protocol == "http" else grpcclient
    address = (server.http_url if protocol == "http" else server.grpc_url).split("://")[1]
    client = module.InferenceServerClient(address)
    model = "plannet_encoder"
    good = inputs_for(bundle, model, seed=1)

    def send(arrays: dict, datatypes: dict | None = None):
        items = []
        for name, array in arrays.items():
            item = module.InferInput(name, list(array.shape), (datatypes or {}).get(name, {
                np.dtype("float32"): "FP32", np.dtype("int64"): "INT64", np.dtype("float64"): "FP64"}[array.dtype]))
            item.set_data_from_numpy(array)
            items.append(item)
        return client.infer(model, items)

    nan_image = good["image"].copy()
    nan_image[0, 0, 0, 0] = np.nan
    malformed = {
        "wrong rank": {**good, "image": good["image"][0]},
        "wrong fixed size": {**good, "image": good["image"][:, :, :-1]},
        "wrong dtype": {**good, "text_ids": good["text_ids"].astype(np.float32)},
        "NaN": {**good, "image": nan_image},
        "id past the vocabulary": {**good, "text_ids": good["text_ids"] + 100_000},
        "too many lines": {**good, "text_ids": np.zeros((1, 21, good["text_ids"].shape[2]), np.int64),
                           "text_mask": np.ones((1, 21, good["text_ids"].shape[2]), np.float32)},
        "missing input": {k: v for k, v in good.items() if k != "text_mask"},
    }
    try:
        for what, arrays in malformed.items():
            with pytest.raises(InferenceServerException) as error:
                send(arrays)
            assert str(error.value), what
            result = send(good)  # the server and the model are still fine
            assert result.as_numpy("memory").shape[0] == good["image"].shape[0], what
    finally:
        client.close()


def test_backend_refuses_a_server_that_serves_other_weights_or_shapes(server, bundle, tmp_path):
    model = "plannet_denoiser"
    weights = Bundle(write_client_bundle(bundle, tmp_path / "weights"))
    manifest = json.loads((weights.root / "manifest.json").read_text())
    manifest["models"][model]["sha256"] = "0" * 64
    (weights.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=f"model '{model}': serves weights .* another export"):
        TritonBackend(Bundle(weights.root), server.grpc_url, models=[model])

    shapes = Bundle(write_client_bundle(bundle, tmp_path / "shapes"))
    manifest = json.loads((shapes.root / "manifest.json").read_text())
    manifest["models"][model]["static_dims"]["plan_num_bins"] += 1
    (shapes.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="output 'logits' is FP32.*the contract expects"):
        TritonBackend(Bundle(shapes.root), server.http_url, models=[model])


def test_client_bundle_without_onnx_files_is_enough(server, bundle, reference, tmp_path):
    client = Bundle(write_client_bundle(bundle, tmp_path / "client"))
    model = "plannet_encoder"
    inputs = inputs_for(bundle, model, seed=3)
    with open_backend(client, server.grpc_url) as backend:
        assert_close(backend.run(model, inputs), reference.run(model, inputs), "client bundle")
        with pytest.raises(ContractError, match="NaN"):  # checked before it leaves the process
            backend.run(model, {**inputs, "image": np.full_like(inputs["image"], np.nan)})


def test_backend_urls_and_unreachable_servers(bundle):
    for bad in ("", "ftp://x:1", "127.0.0.1:8000", "http://"):
        with pytest.raises(InputError):
            TritonBackend(bundle, bad)
    with pytest.raises(InputError, match="not a backend"):
        open_backend(bundle, "tcp://127.0.0.1:1")
    (port,) = free_ports(1)
    with pytest.raises(BackendError, match=f"grpc://127.0.0.1:{port} cannot be reached"):
        TritonBackend(bundle, f"grpc://127.0.0.1:{port}")
    assert type(open_backend(bundle, "embedded")).__name__ == "OrtBackend"


def test_two_servers_one_stopped_mid_run_loses_no_request(server, single_repo, bundle, reference):
    model = "plannet_denoiser"
    second = start_server(single_repo)
    requests = [inputs_for(bundle, model, seed=500 + i, sizes=default_sizes("small")) for i in range(120)]
    expected = [reference.run(model, r) for r in requests]
    done = []
    stopped = threading.Event()
    # different protocols on the two servers: the choice of client is per server
    with TritonBackend(bundle, [second.grpc_url, server.http_url], models=[model], backoff_s=0.1) as backend:
        def call(index):
            result = backend.run(model, requests[index])
            done.append(index)
            if len(done) == 30:  # a quarter in: take the second server away while requests fly
                threading.Thread(target=lambda: (second.stop(), stopped.set())).start()
            if len(done) > 30:
                time.sleep(0.01)  # keep requests in flight while the server shuts down
            return result

        try:
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(call, range(len(requests))))
        finally:
            stopped.wait(60)
            second.stop()
        stopped_server, survivor = backend.servers
        assert stopped_server.answered > 0 and survivor.answered > 0, "round robin should use both servers"
        assert stopped_server.failures >= 1 and stopped_server.down_since is not None, "no request met the stop"
        assert stopped_server.answered + survivor.answered == len(requests)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert_close(got, want, f"request {i}")


def test_missing_wheel_is_one_clear_error(monkeypatch, repo):
    import importlib.util

    from posterrt.runtime.triton import server as server_module

    distribution = server_module.find_tritonserver()  # the installed wheel has every piece
    assert distribution.binary.is_file() and distribution.stub.is_file()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real_find_spec(name, *a))
    with pytest.raises(BackendError, match=r"nvidia-pytriton wheel is not installed \(pip install 'posterrt\[serve\]'\)"):
        TritonServer(repo, log=None).start()


def test_server_start_errors(repo, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TritonServer(tmp_path / "nowhere")
    with pytest.raises(InputError, match="--model-control"):
        TritonServer(repo, model_control="sometimes")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        http, metrics = free_ports(2)
        taken = holder.getsockname()[1]
        with pytest.raises(BackendError, match=f"--grpc-port: port {taken} on 127.0.0.1 is in use"):
            TritonServer(repo, http_port=http, grpc_port=taken, metrics_port=metrics, log=None).start()
    finally:
        holder.close()

    broken = tmp_path / "broken"
    shutil.copytree(repo / "plannet_encoder", broken / "plannet_encoder")
    model_file = broken / "plannet_encoder" / "1" / "model.onnx"
    model_file.unlink()
    model_file.write_bytes(b"not an onnx file")
    with pytest.raises(BackendError, match="exited with code .* failed to load 'plannet_encoder'"):
        start_server(broken)


def test_serve_command_runs_until_sigterm(single_repo):
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "posterrt.runtime.cli", "serve", "--repo", str(single_repo), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--model-control", "explicit"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()  # printed once every model is ready
        assert f"serving 1 models (plannet_denoiser) at http://127.0.0.1:{http}" in banner
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        assert client.is_model_ready("plannet_denoiser")
        client.unload_model("plannet_denoiser")  # explicit mode: the repository API is open
        assert not client.is_model_ready("plannet_denoiser")
        client.close()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "stopping tritonserver" in out
    assert "[tritonserver] " in err and "successfully unloaded 'plannet_denoiser'" in err  # log forwarded, clean exit


# --- pipelines through Triton ----------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def poster_request(seed: int):
    from posterrt.runtime.pipelines.request import PosterRequest

    rgb = np.full((96, 128, 3), 200, np.uint8)
    rgb[20:80, 70:110] = (30, 120, 220)
    mask = np.zeros((96, 128), np.float32)
    mask[20:80, 70:110] = 1  # the product: a block right of centre
    return PosterRequest(product=rgb, product_mask=mask, texts=["Fresh juice", "50% off"], size=(256, 256), seed=seed)


def assert_same_poster(got, want, where: str):
    assert psnr(got.image, want.image) > 60, f"{where}: PSNR {psnr(got.image, want.image):.1f} dB"
    assert [e.cls for e in got.proposed] == [e.cls for e in want.proposed], where
    scale = max(want.image.shape[:2])  # boxes are pixels: 1e-5 of the canvas
    for a, b in zip(got.proposed, want.proposed):
        assert np.abs(np.subtract(a.box, b.box)).max() <= 1e-5 * scale and abs(a.score - b.score) <= 1e-5, where


@pytest.fixture(scope="module")
def embedded_posters(bundle_dir):
    from posterrt.runtime.client import PosterClient
    from posterrt.runtime.pipelines import PIPELINES

    with PosterClient(bundle_dir, intra_op_threads=1) as client:
        return {name: client.generate(poster_request(seed=11), pipeline=name) for name in PIPELINES}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_pipeline_through_triton_equals_embedded(server, bundle_dir, embedded_posters, protocol):
    from posterrt.runtime.client import PosterClient

    url = server.http_url if protocol == "http" else server.grpc_url
    with PosterClient(bundle_dir, url) as client:
        for name, want in embedded_posters.items():
            assert_same_poster(client.generate(poster_request(seed=11), pipeline=name), want, f"{protocol} {name}")


def test_poster_client_serves_threads_and_asyncio(server, bundle_dir):
    import asyncio

    from posterrt.runtime.client import PosterClient

    with PosterClient(bundle_dir, server.grpc_url, max_workers=3) as client:
        sequential = [client.generate(poster_request(seed), pipeline="render") for seed in range(3)]
        with ThreadPoolExecutor(3) as pool:
            threaded = list(pool.map(lambda seed: client.generate(poster_request(seed), pipeline="render"), range(3)))

        async def gather():
            return await asyncio.gather(*(client.agenerate(poster_request(seed), pipeline="render") for seed in range(3)))

        awaited = asyncio.run(gather())
    for seed in range(3):
        assert_same_poster(threaded[seed], sequential[seed], f"thread seed {seed}")
        assert_same_poster(awaited[seed], sequential[seed], f"asyncio seed {seed}")
    assert psnr(sequential[0].image, sequential[1].image) < 60, "different seeds must give different posters"
