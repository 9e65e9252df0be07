"""Serving performance features, functionally (timings live in benchmarks/RESULTS.md, not here):
the server-side PlanNet loop gives the client loop's tokens for the same seed (in-process with a
stand-in for Triton's ``pb_utils``, then through a real tritonserver, in-process and BLS), the
generator state it carries, the repository folder it is served from, and the serving defaults."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import CONTRACTS
from posterrt.runtime.errors import ContractError, InputError
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig
from posterrt.runtime.server_stages import SERVER_STAGES, SETTINGS_FILE
from posterrt.runtime.server_stages import plannet as sl
from posterrt.runtime.server_stages import rng as wire
from posterrt.runtime.triton import model_config as mc
from posterrt.runtime.triton.repository import STUBS, build_repository

from helpers_triton import export_served_bundle, fake_request, load_python_model, start_server


@pytest.fixture(scope="module")
def plan_bundle(tmp_path_factory) -> Path:
    """PlanNet alone (two small real models), or POSTERRT_TEST_BUNDLE when it names a bundle."""
    reuse = os.environ.get("POSTERRT_TEST_BUNDLE")
    if reuse:
        return Path(reuse)
    return export_served_bundle(tmp_path_factory.mktemp("plan-bundle") / "tiny", families=("plannet",))


@pytest.fixture(scope="module")
def bundle(plan_bundle) -> Bundle:
    return Bundle(plan_bundle)


@pytest.fixture(scope="module")
def sampler(bundle) -> PlanNetSampler:
    return PlanNetSampler(PlanNetSamplerConfig.from_bundle_config(bundle.config["plannet"]))


@pytest.fixture(scope="module")
def embedded(bundle):
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        yield backend


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def memory_for(bundle, seed: int, memory_tokens: int | None = None) -> dict:
    sizes = {**default_sizes("small"), "batch": 1}
    if memory_tokens:
        sizes["memory_tokens"] = memory_tokens
    contract = bundle.contract("plannet_denoiser")
    inputs = sample_inputs(contract, sizes, seed)
    return {"memory": inputs["memory"], "memory_mask": inputs["memory_mask"]}


def fixed_product(sampler) -> np.ndarray:
    fixed = sampler.blank_tokens(1)
    fixed[0, 0, 0] = 0  # element 0 is the product, as the planner fixes it
    return fixed


def client_loop(embedded, sampler, memory, fixed, steps, seed):
    """The pipeline's own loop: one backend call per level. Returns (tokens, generator after)."""
    generator = np.random.default_rng([seed, 7])
    denoiser = embedded.bind("plannet_denoiser", memory)

    def denoise(tokens, timestep):
        return denoiser({"tokens": tokens, "timestep": timestep})["logits"]

    return sampler.sample(denoise, 1, generator, steps=steps, fixed_tokens=fixed), generator


# --- generator state on the wire ---------------------------------------------------------------
def test_generator_state_round_trips_mid_stream():
    generator = np.random.default_rng([fresh_seed(), 3])
    generator.random(5)
    generator.integers(0, 10, size=3, dtype=np.uint32)  # leaves a buffered 32-bit half behind
    words = wire.generator_state(generator)
    assert words.dtype == np.int64 and words.shape == (wire.RNG_WORDS,)
    copy = wire.generator_from_state(words)
    assert copy.bit_generator.state == generator.bit_generator.state
    assert np.array_equal(copy.gumbel(size=100), generator.gumbel(size=100))


def test_bad_generator_states_are_refused():
    words = wire.generator_state(np.random.default_rng(1))
    even_increment = words.copy()
    even_increment[3] &= ~1
    with pytest.raises(ContractError, match="rng_state"):
        wire.generator_from_state(even_increment)
    with pytest.raises(InputError, match="PCG64"):
        wire.generator_state(np.random.Generator(np.random.MT19937(1)))


# --- the sampler model in-process, with a stand-in for pb_utils --------------------------------
@pytest.fixture(scope="module")
def sampler_repo(bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("sampler-repo") / "repo"
    build_repository(bundle, repo, models=[sl.NAME])
    return repo


@pytest.fixture(scope="module")
def sampler_model(sampler_repo):
    """The stub loaded from the repository as Triton loads it."""
    return load_python_model(sampler_repo / sl.NAME)


def sampler_request(memory, fixed, steps, generator) -> dict:
    inputs = {**memory, "fixed_tokens": fixed, "steps": np.full(len(fixed), steps, dtype=np.int64),
              "rng_state": wire.generator_state(generator)[None]}
    return fake_request(inputs)


@pytest.mark.parametrize("steps", [100, 7])
def test_server_loop_gives_the_client_loops_tokens(sampler_model, bundle, sampler, embedded, steps):
    seed = fresh_seed()
    memory, fixed = memory_for(bundle, seed), fixed_product(sampler)
    expected, after = client_loop(embedded, sampler, memory, fixed, steps, seed)
    (response,) = sampler_model.execute([sampler_request(memory, fixed, steps, np.random.default_rng([seed, 7]))])
    assert response.error is None, response.error
    assert np.array_equal(response.outputs["tokens"], expected)
    assert (response.outputs["tokens"][:, 0, 0] == 0).all(), "fixed tokens stay"
    assert wire.generator_from_state(response.outputs["final_rng_state"][0]).bit_generator.state == after.bit_generator.state


def test_requests_batched_into_one_loop_each_get_their_own_tokens(sampler_model, bundle, sampler, embedded):
    """Three plans with their own seeds in one loop, a fourth with another memory length in its own,
    and a bad request answered with an error alone."""
    seeds = [fresh_seed() for _ in range(4)]
    memories = [memory_for(bundle, s) for s in seeds[:3]] + [memory_for(bundle, seeds[3], memory_tokens=5)]
    fixed, steps = fixed_product(sampler), 10
    requests = [sampler_request(m, fixed, steps, np.random.default_rng([s, 7])) for m, s in zip(memories, seeds)]
    bad = sampler_request(memories[0], fixed, sampler.config.num_timesteps + 1, np.random.default_rng(0))
    calls = []
    run = sampler_model.denoiser.session.run_with_iobinding
    sampler_model.denoiser.session.run_with_iobinding = lambda binding: (calls.append(1), run(binding))
    try:
        responses = sampler_model.execute(requests[:2] + [bad] + requests[2:])
    finally:
        del sampler_model.denoiser.session.run_with_iobinding
    assert len(calls) == 2 * steps, "two loops: three plans batched, the other memory length alone"
    assert "steps" in str(responses[2].error) and responses[2].outputs == {}
    for response, memory, seed in zip(responses[:2] + responses[3:], memories, seeds):
        assert response.error is None, response.error
        expected, _ = client_loop(embedded, sampler, memory, fixed, steps, seed)
        assert np.array_equal(response.outputs["tokens"], expected)


# --- the repository folder --------------------------------------------------------------------
def read_config(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def test_sampler_folder(bundle, sampler_repo):
    folder = sampler_repo / sl.NAME
    version = folder / "1"
    assert sorted(p.name for p in version.iterdir()) == sorted(["model.py", "bundle", SETTINGS_FILE])
    assert (version / "model.py").read_text() == (STUBS / "plannet_sampler.py").read_text()
    assert os.path.samefile(Bundle(version / "bundle").model_path("plannet_denoiser"), bundle.model_path("plannet_denoiser"))
    assert json.loads((version / SETTINGS_FILE).read_text())["settings"]["config"] == bundle.config["plannet"]
    config = read_config(folder)
    contract = sl.contract(bundle)
    assert config.backend == "python" and [t.name for t in config.input] == contract.input_names
    assert [t.name for t in config.output] == contract.output_names
    assert config.parameters[mc.STAGE_SHA256_PARAMETER].string_value == SERVER_STAGES[sl.NAME].identity(bundle)
    assert config.parameters[sl.MODEL_CALL_PARAMETER].string_value == "in-process"


def test_which_repositories_get_the_sampler(bundle, tmp_path):
    whole = build_repository(bundle, tmp_path / "whole")
    assert [m.name for m in whole.server_loops] == [sl.NAME, sl.NAME + "_stream"], "the stage and its streamed model"
    assert (tmp_path / "whole" / sl.NAME).is_dir() and (tmp_path / "whole" / (sl.NAME + "_stream")).is_dir()
    streamed = read_config(tmp_path / "whole" / (sl.NAME + "_stream"))
    assert streamed.model_transaction_policy.decoupled and not read_config(tmp_path / "whole" / sl.NAME).model_transaction_policy.decoupled
    assert [t.name for t in streamed.output] == [*sl.contract(bundle).output_names, "progress"]
    assert [m.name for m in whole.models] == list(bundle.models), "bundle models reported as before"
    subset = build_repository(bundle, tmp_path / "subset", models=["plannet_denoiser"])
    assert not subset.server_loops and not (tmp_path / "subset" / sl.NAME).exists()
    off = build_repository(bundle, tmp_path / "off", mc.ServingOptions(server_loops=False))
    assert not off.server_loops
    gpu = build_repository(bundle, tmp_path / "gpu", mc.ServingOptions(flavor="gpu-onnx"))
    assert not gpu.server_loops
    with pytest.raises(InputError, match="cpu flavor only"):
        build_repository(bundle, tmp_path / "gpu2", mc.ServingOptions(flavor="gpu-onnx"), models=[sl.NAME])
    bls = build_repository(bundle, tmp_path / "bls", mc.ServingOptions(extra_parameters={sl.MODEL_CALL_PARAMETER: "bls"}),
                           models=[sl.NAME])
    assert read_config(bls.server_loops[0].folder).parameters[sl.MODEL_CALL_PARAMETER].string_value == "bls"


# --- serving defaults -------------------------------------------------------------------------
def resolved(name):
    contract = CONTRACTS[name]
    return contract.resolve({dim: 8 for dim in contract.static_dims})


def test_spinning_is_a_parameter_only_when_asked_for():
    quiet = mc.build_model_config(resolved("plannet_denoiser"), mc.ServingOptions())
    assert "allow_spinning" not in quiet.parameters
    spinning = mc.build_model_config(resolved("plannet_denoiser"), mc.ServingOptions(allow_spinning=True))
    assert spinning.parameters["allow_spinning"].string_value == "1"


# --- through a real tritonserver -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    """A server of the whole (PlanNet) bundle: the repository includes the in-process sampler."""
    repo = tmp_path_factory.mktemp("served") / "repo"
    build_repository(bundle, repo)
    server = start_server(repo)
    yield server
    server.stop()


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_planner_through_triton_uses_the_server_loop_and_plans_as_embedded(served, bundle, embedded, protocol):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.plan import PlanNetPlanner
    from posterrt.runtime.pipelines.request import PosterRequest

    url = served.grpc_url if protocol == "grpc" else served.http_url
    rng = np.random.default_rng(fresh_seed())
    request = PosterRequest(product=rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), texts=["New arrival", "Sale"],
                            size=(256, 384), seed=fresh_seed()).validate()
    with TritonBackend(bundle, url) as triton:
        planner = PlanNetPlanner(triton)
        assert planner.server_loop is not None, "the server serves plannet_sampler for this bundle"
        before = triton.servers[0].answered
        served_plan = planner(request)
        assert triton.servers[0].answered == before + 1, "only the encoder went through the per-model path"
        client_plan = PlanNetPlanner(triton, server_loop=False)(request)
    embedded_plan = PlanNetPlanner(embedded)(request)
    assert PlanNetPlanner(embedded).server_loop is None
    for plan in (served_plan, client_plan):
        assert [(e.cls, e.box) for e in plan] == [(e.cls, e.box) for e in embedded_plan]


@pytest.mark.triton
def test_bls_sampler_gives_the_same_tokens(bundle, sampler, embedded, tmp_path):
    repo = tmp_path / "repo"
    build_repository(bundle, repo, mc.ServingOptions(extra_parameters={sl.MODEL_CALL_PARAMETER: "bls"}))
    server = start_server(repo)
    try:
        from posterrt.runtime.backends.triton import TritonBackend

        with TritonBackend(bundle, server.grpc_url) as triton:
            loop = triton.server_stage(sl.NAME)
            seed = fresh_seed()
            memory, fixed = memory_for(bundle, seed), fixed_product(sampler)
            generator = np.random.default_rng([seed, 7])
            tokens = loop(memory["memory"], memory["memory_mask"], fixed, 12, [generator])
        expected, after = client_loop(embedded, sampler, memory, fixed, 12, seed)
        assert np.array_equal(tokens, expected)
        assert generator.bit_generator.state == after.bit_generator.state
    finally:
        server.stop()


# --- the benchmark's bookkeeping (no timing assertions: synthetic calls) ------------------------
def test_step_hoisting_pools_rounds_and_ignores_the_gap_between_them():
    from posterrt.benchmarks.serving import step_hoisting

    def round_(start):  # prologue, then 4 steps of 10 ms every 12 ms
        return [("enc", start, 0.005)] + [("unet", start + 0.01 + 0.012 * i, 0.010) for i in range(4)]

    found = step_hoisting([round_(0.0), round_(100.0)], "unet")
    assert found["steps"] == 4
    assert found["interval_p50_ms"] == pytest.approx(12.0) and found["model_call_p50_ms"] == pytest.approx(10.0)
    assert found["loop_overhead_ratio"] == pytest.approx(1.2)
    assert step_hoisting([round_(0.0)[:2]], "unet") is None


def test_targets_are_checked_against_the_issues_limits():
    from posterrt.benchmarks.serving import check_targets, target_notes

    results = {
        "stages": [{"pipeline": "layout", "stage": "end_to_end", "backend": "triton-grpc", "ratio_to_embedded": 1.10},
                   {"pipeline": "render", "stage": "end_to_end", "backend": "triton-grpc", "ratio_to_embedded": 1.06},
                   {"pipeline": "render", "stage": "end_to_end", "backend": "embedded", "ratio_to_embedded": 1.0}],
        "throughput": [{"model": "radm_head", "dynamic_batching": True, "concurrency": c, "rps": r}
                       for c, r in ((1, 10.0), (4, 16.0))],
        "step_hoisting": [{"pipeline": "background", "backend": "embedded", "step_model": "bg_unet",
                           "loop_overhead_ratio": 1.01}],
    }
    met = {(t["target"], t["what"].split(",")[0]): t["met"] for t in check_targets(results)}
    assert met == {(2, "layout end_to_end"): True, (2, "render end_to_end"): False,
                   (3, "radm_head: requests/s at concurrency 4 / concurrency 1"): True,
                   (4, "background bg_unet on embedded: step interval / call"): True}
    assert any("NOT met" in line for line in target_notes(check_targets(results)))


@pytest.mark.triton
def test_the_streamed_sampler_reports_each_level_in_order_and_plans_as_embedded(served, bundle, embedded):
    """The server coalesces PlanNet's sub-millisecond levels into a few progress responses; the
    client still reports one event per level, in order."""
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.plan import PlanNetPlanner
    from posterrt.runtime.pipelines.request import PosterRequest
    from posterrt.runtime.progress import RunControl, controlled

    rng = np.random.default_rng(fresh_seed())
    request = PosterRequest(product=rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), texts=["New arrival"],
                            size=(256, 384), layout_steps=60, seed=fresh_seed()).validate()
    events = []
    with TritonBackend(bundle, served.grpc_url) as triton:
        planner = PlanNetPlanner(triton)
        assert planner.server_loop.streaming, "gRPC: the streamed plannet_sampler"
        with controlled(RunControl(events.append)):
            plan = planner(request)
    assert [(e.stage, e.step, e.total) for e in events] == [("plan", step, 60) for step in range(1, 61)]
    embedded_plan = PlanNetPlanner(embedded)(request)
    assert [(e.cls, e.box) for e in plan] == [(e.cls, e.box) for e in embedded_plan]
