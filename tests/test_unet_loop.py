"""The server-side UNet loops (``bg_unet_sampler``, ``render_unet_sampler``): the loop model gives
the client loop's latents for the same seed and scheduler (in-process with a stand-in for Triton's
``pb_utils``, then through a real tritonserver, in-process and BLS), answers a bad request alone,
and is written into the repository with the settings a client checks before using it."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.pipelines.diffusion import denoise
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.schedulers import SCHEDULERS, get_scheduler
from posterrt.runtime.families import unet_families
from posterrt.runtime.server_stages import SERVER_STAGES, SETTINGS_FILE
from posterrt.runtime.server_stages import unet as ul
from posterrt.runtime.server_stages.rng import generator_from_state, generator_state
from posterrt.runtime.triton import model_config as mc
from posterrt.runtime.triton import repository
from posterrt.runtime.triton.repository import STUBS, build_repository

from helpers_triton import FakeTensor, fake_request, load_python_model, start_server

UNETS = list(unet_families())
LOOPS = [ul.stage_name(unet) for unet in UNETS]
#: the stub and the client run the same ONNX file with the same ONNX Runtime and thread count;
#: the loops agree to float32 rounding (in practice bit for bit)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


@pytest.fixture(scope="module")
def embedded(bundle):
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        yield backend


@pytest.fixture(scope="module")
def loop_repo(bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("unet-loop-repo") / "repo"
    build_repository(bundle, repo, models=LOOPS)
    return repo


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def load_loop_model(repo: Path, name: str):
    """The stub loaded from the repository as Triton loads it."""
    return load_python_model(repo / name)


def loop_case(bundle, unet: str, guidance: float, seed: int):
    """Random step-invariant inputs batched for ``guidance`` and the initial latents."""
    contract = bundle.contract(unet)
    sizes = {**default_sizes("small"), "cfg_batch": 2 if guidance > 1 else 1}
    inputs = sample_inputs(contract, sizes, seed)
    fixed = {name: array for name, array in inputs.items() if name not in ul.PER_STEP_INPUTS}
    return fixed, inputs["sample"][:1]


def client_denoise(embedded, bundle, unet, scheduler_name, fixed, latents, steps, guidance, seed, interval=1):
    """The pipelines' own loop in-process. Returns (latents, generator after)."""
    config = bundle.config[unet_families()[unet].config_key]["scheduler"]
    generator = np.random.default_rng([seed, 11])
    result = denoise(embedded, unet, get_scheduler(scheduler_name, config), latents, steps, guidance, fixed, generator,
                     interval=interval)
    return result, generator


def loop_request(fixed, latents, steps, guidance, scheduler_name, generator, interval=1) -> dict:
    inputs = {**{name: array[None] for name, array in fixed.items()}, "latents": latents,
              "steps": np.array([steps], np.int64), "guidance": np.array([guidance], np.float32),
              "scheduler": np.array([list(SCHEDULERS).index(scheduler_name)], np.int64),
              "cache_interval": np.array([interval], np.int64), "rng_state": generator_state(generator)[None]}
    return fake_request(inputs)


@pytest.mark.parametrize("unet", UNETS)
@pytest.mark.parametrize("scheduler_name,guidance", [("ddim", 7.5), ("ddpm", 1.0), ("euler", 3.0)])
def test_server_loop_gives_the_client_loops_latents(loop_repo, bundle, embedded, unet, scheduler_name, guidance):
    seed, steps = fresh_seed(), 3
    fixed, latents = loop_case(bundle, unet, guidance, seed)
    expected, after = client_denoise(embedded, bundle, unet, scheduler_name, fixed, latents, steps, guidance, seed)
    model = load_loop_model(loop_repo, ul.stage_name(unet))
    request = loop_request(fixed, latents, steps, guidance, scheduler_name, np.random.default_rng([seed, 11]))
    (response,) = model.execute([request])
    assert response.error is None, response.error
    assert not np.allclose(expected, latents, atol=1e-3), "the loop changed the latents"
    np.testing.assert_allclose(response.outputs["denoised"], expected, rtol=RTOL, atol=ATOL)
    state = generator_from_state(response.outputs["final_rng_state"][0]).bit_generator.state
    assert state == after.bit_generator.state, "the server continued the client's generator as the client loop does"


@pytest.mark.parametrize("unet", UNETS)
def test_server_loop_caches_features_as_the_client_loop_does(loop_repo, bundle, embedded, unet):
    """cache_interval 2: the stub alternates the deep and shallow steps of its small bundle exactly as
    the client loop does (the same latents), and the result is not the uncached one."""
    seed, steps, guidance = fresh_seed(), 4, 7.5
    fixed, latents = loop_case(bundle, unet, guidance, seed)
    expected, _ = client_denoise(embedded, bundle, unet, "ddim", fixed, latents, steps, guidance, seed, interval=2)
    uncached, _ = client_denoise(embedded, bundle, unet, "ddim", fixed, latents, steps, guidance, seed)
    model = load_loop_model(loop_repo, ul.stage_name(unet))
    (response,) = model.execute([loop_request(fixed, latents, steps, guidance, "ddim",
                                              np.random.default_rng([seed, 11]), interval=2)])
    assert response.error is None, response.error
    np.testing.assert_allclose(response.outputs["denoised"], expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(expected, uncached, rtol=RTOL, atol=ATOL)


def test_a_bad_request_is_answered_alone(loop_repo, bundle, embedded):
    model = load_loop_model(loop_repo, ul.stage_name("bg_unet"))
    seed = fresh_seed()
    fixed, latents = loop_case(bundle, "bg_unet", 7.5, seed)
    good = loop_request(fixed, latents, 2, 7.5, "ddim", np.random.default_rng(seed))
    unguided = loop_request(fixed, latents, 2, 1.0, "ddim", np.random.default_rng(seed))  # inputs batched for 7.5
    unknown_scheduler = dict(good, scheduler=FakeTensor("scheduler", np.array([len(SCHEDULERS)], np.int64)))
    nan_latents = dict(good, latents=FakeTensor("latents", np.full_like(latents, np.nan)))
    responses = model.execute([unguided, good, unknown_scheduler, nan_latents])
    assert "guidance" in str(responses[0].error) and "batched for guidance" in str(responses[0].error)
    assert responses[1].error is None and responses[1].outputs["denoised"].shape == latents.shape
    assert "'scheduler'" in str(responses[2].error)
    assert "'latents'" in str(responses[3].error) and "NaN" in str(responses[3].error)


# --- the repository folder --------------------------------------------------------------------
def read_config(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


@pytest.mark.parametrize("unet", UNETS)
def test_loop_folder(bundle, loop_repo, unet):
    folder = loop_repo / ul.stage_name(unet)
    version = folder / "1"
    assert sorted(p.name for p in version.iterdir()) == sorted(["model.py", "bundle", SETTINGS_FILE])
    assert (version / "model.py").read_text() == (STUBS / "unet_sampler.py").read_text()
    for model in (unet, *unet_families()[unet].cached_steps):  # the feature cache's steps run in-process too
        assert os.path.samefile(Bundle(version / "bundle").model_path(model), bundle.model_path(model))
    settings = json.loads((version / SETTINGS_FILE).read_text())["settings"]
    assert settings["scheduler_config"] == bundle.config[unet_families()[unet].config_key]["scheduler"]
    assert settings["schedulers"] == list(SCHEDULERS)
    config = read_config(folder)
    contract = ul.loop_contract(bundle.contract(unet))
    assert config.backend == "python" and [t.name for t in config.input] == contract.input_names
    assert not config.HasField("dynamic_batching"), "one request is one whole loop"
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters[mc.STAGE_SHA256_PARAMETER] == SERVER_STAGES[ul.stage_name(unet)].identity(bundle)
    assert parameters[ul.MODEL_CALL_PARAMETER] == "in-process", "a tiny UNet is loaded in the loop's own stub"


def test_a_big_unet_is_called_through_bls(bundle, tmp_path, monkeypatch):
    """Above the size limit the loop holds no second copy of the weights: no model file, BLS calls."""
    monkeypatch.setattr(repository, "IN_PROCESS_LIMIT_BYTES", 0)
    report = build_repository(bundle, tmp_path / "repo", models=[ul.stage_name("bg_unet")])
    loop, _ = report.server_loops  # the stage and its streamed model
    assert read_config(loop.folder).parameters[ul.MODEL_CALL_PARAMETER].string_value == "bls"
    assert sorted(p.name for p in (loop.folder / "1").iterdir()) == sorted(["model.py", "bundle", SETTINGS_FILE])
    assert not list((loop.folder / "1" / "bundle").glob("*.onnx")), "no copy of the UNet"


def test_which_repositories_get_the_unet_loops(bundle, tmp_path):
    whole = build_repository(bundle, tmp_path / "whole", models=None)
    assert set(LOOPS) <= {m.name for m in whole.server_loops}
    off = build_repository(bundle, tmp_path / "off", mc.ServingOptions(server_loops=False), models=["bg_unet"])
    assert not off.server_loops
    assert not build_repository(bundle, tmp_path / "gpu", mc.ServingOptions(flavor="gpu-onnx"), models=["bg_unet"]).server_loops


# --- through a real tritonserver -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    """The background pipeline's models and its loop, in-process and BLS (the latter under another name)."""
    repo = tmp_path_factory.mktemp("unet-served") / "repo"
    build_repository(bundle, repo, models=["clip_text_encoder", "image_encoder", "vae_encoder", "bg_unet", "vae_decoder",
                                           ul.stage_name("bg_unet")])
    server = start_server(repo)
    yield server
    server.stop()


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_background_through_triton_uses_the_server_loop_and_paints_as_embedded(served, bundle, embedded, protocol):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.background import BackgroundPipeline
    from posterrt.runtime.pipelines.request import PosterRequest

    rng = np.random.default_rng(fresh_seed())
    product = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    mask = np.zeros((64, 48), np.float32)
    mask[16:48, 12:36] = 1.0
    request = PosterRequest(product=product, product_mask=mask, category="juice", size=(256, 256), steps=3,
                            seed=fresh_seed(), scheduler="ddpm")
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with TritonBackend(bundle, url) as triton:
        pipeline = BackgroundPipeline(triton, progress=False)
        assert pipeline.server_loop is not None, "the server serves bg_unet_sampler for this bundle"
        before = triton.servers[0].answered
        image = pipeline(request).image
        # the prologue's VAE and text encoders (no style image: no image encoder) and the decoder
        # through the per-model path, no bg_unet call: the three steps ran in the server's loop
        assert triton.servers[0].answered == before + 3
        cached = pipeline(replace(request, cache_interval=2)).image  # the feature cache in the server's loop
        assert triton.servers[0].answered == before + 6
    expected = BackgroundPipeline(embedded, progress=False)(request).image
    assert BackgroundPipeline(embedded, progress=False).server_loop is None
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, "same latents up to float32 rounding"
    expected = BackgroundPipeline(embedded, progress=False)(replace(request, cache_interval=2)).image
    assert np.abs(cached.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.triton
def test_bls_loop_gives_the_client_loops_latents(bundle, embedded, tmp_path):
    repo = tmp_path / "repo"
    build_repository(bundle, repo, mc.ServingOptions(extra_parameters={ul.MODEL_CALL_PARAMETER: "bls"}),
                     models=["bg_unet", ul.stage_name("bg_unet")])
    server = start_server(repo)
    try:
        from posterrt.runtime.backends.triton import TritonBackend

        with TritonBackend(bundle, server.grpc_url) as triton:
            loop = triton.server_stage(ul.stage_name("bg_unet"))
            seed, guidance = fresh_seed(), 7.5
            fixed, latents = loop_case(bundle, "bg_unet", guidance, seed)
            config = bundle.config["stable_diffusion"]["scheduler"]
            generator = np.random.default_rng([seed, 11])
            result = loop(get_scheduler("ddpm", config), latents, 3, guidance, fixed, generator)
        expected, after = client_denoise(embedded, bundle, "bg_unet", "ddpm", fixed, latents, 3, guidance, seed)
        np.testing.assert_allclose(result, expected, rtol=RTOL, atol=ATOL)
        assert generator.bit_generator.state == after.bit_generator.state
    finally:
        server.stop()


@pytest.mark.triton
def test_a_client_with_other_scheduler_settings_loops_itself(served, bundle, monkeypatch):
    """The settings hash guards the loop: a bundle whose scheduler config differs does not use it."""
    from posterrt.runtime.backends.triton import TritonBackend

    with TritonBackend(bundle, served.grpc_url) as triton:
        assert triton.server_stage(ul.stage_name("bg_unet")) is not None
        monkeypatch.setitem(triton.bundle.config["stable_diffusion"]["scheduler"], "beta_end", 0.0234)
        assert triton.server_stage(ul.stage_name("bg_unet")) is None


def test_repo_build_flags_choose_the_loops_and_how_they_call_the_unet(bundle, tmp_path, capsys):
    from posterrt.runtime import cli

    assert cli.main(["repo", "build", "--bundle", str(bundle.root), "--out", str(tmp_path / "bls"),
                     "--models", "bg_unet,bg_unet_sampler", "--unet-loop-call", "bls"]) == 0
    assert "bg_unet_sampler" in capsys.readouterr().out
    config = read_config(tmp_path / "bls" / "bg_unet_sampler")
    assert config.parameters[ul.MODEL_CALL_PARAMETER].string_value == "bls"
    assert cli.main(["repo", "build", "--bundle", str(bundle.root), "--out", str(tmp_path / "none"),
                     "--no-server-loops"]) == 0
    assert not [p for p in (tmp_path / "none").iterdir() if p.name.endswith("_sampler")]
    capsys.readouterr()
    assert cli.main(["repo", "build", "--bundle", str(bundle.root), "--out", str(tmp_path / "bad"),
                     "--models", "bg_unet_loop"]) == 2
    error = capsys.readouterr().err
    assert "bg_unet_loop" in error and "bg_unet_sampler" in error, "the message lists the loops that exist"


# --- progress, cancellation and deadlines through the streamed stage (bg_unet_sampler_stream) ---
def background_request(seed: int, steps: int):
    from posterrt.runtime.pipelines.request import PosterRequest

    rng = np.random.default_rng(seed)
    mask = np.zeros((64, 48), np.float32)
    mask[16:48, 12:36] = 1.0
    return PosterRequest(product=rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), product_mask=mask, size=(256, 256),
                         steps=steps, seed=seed)


@pytest.mark.triton
def test_the_streamed_loop_reports_each_step_in_order_and_paints_as_unstreamed(served, bundle):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.background import BackgroundPipeline
    from posterrt.runtime.progress import RunControl, controlled

    request, events = background_request(fresh_seed(), 5), []
    with TritonBackend(bundle, served.grpc_url) as grpc, TritonBackend(bundle, served.http_url) as http:
        streamed = BackgroundPipeline(grpc, progress=False)
        assert served.grpc_url in {s.url for s in streamed.server_loop.streaming}, "gRPC streams"
        with controlled(RunControl(events.append)):
            image = streamed(request).image
        plain = BackgroundPipeline(http, progress=False)
        assert not plain.server_loop.streaming, "Triton's HTTP endpoint refuses decoupled models: the plain stage"
        unstreamed = plain(request).image
    assert [(e.stage, e.step, e.total) for e in events] == [("background", step, 5) for step in range(1, 6)]
    assert np.array_equal(image, unstreamed), "the streamed stage gives the plain stage's result"


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_deadline_stops_the_server_loop_early(served, bundle, protocol):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.errors import DeadlineExceeded
    from posterrt.runtime.pipelines.background import BackgroundPipeline
    from posterrt.runtime.progress import RunControl, controlled

    url = served.grpc_url if protocol == "grpc" else served.http_url
    with TritonBackend(bundle, url) as triton:
        pipeline = BackgroundPipeline(triton, progress=False)
        with controlled(RunControl(timeout=1.0)), pytest.raises(DeadlineExceeded) as caught:
            pipeline(background_request(fresh_seed(), 50))
    # the step is the server loop's own count, in its answer: it stopped long before its 50 steps
    assert caught.value.stage == "background" and caught.value.total == 50 and 1 <= caught.value.step < 40
    assert "deadline of" in str(caught.value)


@pytest.mark.triton
def test_a_cancelled_loop_frees_the_instance_within_a_step_and_leaves_nothing_behind(served, bundle):
    """A 50-step loop cancelled after a few steps: the next request on the stage's single instance is
    answered within about one step of the cancel; no shared-memory region stays registered; the
    server's RSS stays flat over cancel cycles (10 here: CI time; the soak runs more)."""
    import threading
    import time

    from posterrt.benchmarks.soak import rss_mb
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.errors import RequestCancelled
    from posterrt.runtime.progress import RunControl, controlled

    fixed, latents = loop_case(bundle, "bg_unet", 7.5, fresh_seed())
    config = bundle.config["stable_diffusion"]["scheduler"]

    def run(stage, steps, control):
        with controlled(control):
            return stage(get_scheduler("ddim", config), latents, steps, 7.5, fixed, np.random.default_rng(1))

    with TritonBackend(bundle, served.grpc_url, shared_memory=True, shm_threshold_bytes=1) as triton:
        stage = triton.server_stage(ul.stage_name("bg_unet"))
        started = time.monotonic()
        run(stage, 1, RunControl())
        one_step = time.monotonic() - started  # a whole one-step request: round trips, scheduler, one UNet call
        before = None
        for cycle in range(10):
            stamps, reported, third = [], [], threading.Event()

            def report(event):
                stamps.append(time.monotonic())
                reported.append(event.step)
                if event.step == 3:
                    third.set()

            control, outcome = RunControl(report), {}
            worker = threading.Thread(target=lambda: outcome.setdefault("error", _raised(run, stage, 50, control)))
            worker.start()
            assert third.wait(30)
            triton.run("vae_decoder", {"latent": latents})  # a per-model call through shared memory meanwhile
            control.cancel()
            cancelled, reached = time.monotonic(), reported[-1]
            run(stage, 1, RunControl())  # waits for the stage's only instance
            freed = time.monotonic() - cancelled
            worker.join(30)
            # stopped within a step of the cancel: the step in flight when it came (its report may still be on the wire)
            assert isinstance(outcome["error"], RequestCancelled) and outcome["error"].step <= reached + 2, \
                (outcome["error"], reached)
            step = float(np.median(np.diff(stamps)))
            assert freed <= one_step + 1.5 * step + 0.2, f"instance free {freed:.3f} s after the cancel (step {step:.3f} s)"
            if cycle == 1:  # after the warm-up
                before = rss_mb(served.process.pid, with_children=True)
        after = rss_mb(served.process.pid, with_children=True)
        assert after - before <= 16.0, f"server RSS grew {after - before:.1f} MB over 8 cancel cycles"
        pool = {region.name for region in triton._shm.regions_on(served.grpc_url)}
        assert pool and shm_regions(triton) == pool, "only the pool's regions: no request left one registered"
    with TritonBackend(bundle, served.grpc_url) as probe:
        assert not shm_regions(probe), "every region was unregistered when the backend closed"


def shm_regions(triton) -> set[str]:
    with triton.servers[0].connections.client() as client:
        status = client.get_system_shared_memory_status(as_json=True)
    return {region["name"] for region in status.get("regions", {}).values()} if isinstance(status.get("regions"), dict) \
        else {region["name"] for region in status.get("regions", [])}


def _raised(function, *args):
    try:
        function(*args)
    except Exception as error:
        return error
    return None
