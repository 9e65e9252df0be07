"""The server-side RADM layout stage (``radm_layout``): the stage model gives the client stage's
boxes for the same seed (in-process with a stand-in for Triton's ``pb_utils``, then through a real
tritonserver), answers a bad request alone, and is written into the repository with the settings a
client checks before using it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.pipelines.layout import RADMLayout
from posterrt.runtime.text import encode_lines
from posterrt.runtime.families import FAMILIES
from posterrt.runtime.server_stages import BUNDLE_FOLDER, SERVER_STAGES
from posterrt.runtime.server_stages import radm_layout as ll
from posterrt.runtime.triton.model_config import STAGE_SHA256_PARAMETER
from posterrt.runtime.triton.repository import STUBS, build_repository

from helpers_triton import FakeTensor, fake_request, load_python_model, start_server

RADM = list(FAMILIES["radm"].models)
TEXTS = ["Fresh orange juice", "50% off today", "New"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


@pytest.fixture(scope="module")
def embedded(bundle):
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        yield backend


@pytest.fixture(scope="module")
def stage_repo(bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("layout-loop-repo") / "repo"
    build_repository(bundle, repo, models=[ll.NAME])
    return repo


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def load_stage_model(repo: Path):
    """The stub loaded from the repository as Triton loads it."""
    return load_python_model(repo / ll.NAME)


def read_config(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def stage_case(layout: RADMLayout, texts: list[str], seed: int):
    """A random 256x320 image and the texts' tokens (None without texts)."""
    image = np.random.default_rng(seed).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    ids, attention = encode_lines(layout.tokenizer, texts) if texts else (None, None)
    return image, ids, attention


def stage_request(image, ids, attention, seed: int, steps: int, pad_lines: int = 0) -> dict:
    """A request as ``RadmServerLayout`` sends it, with ``pad_lines`` padding rows past the texts."""
    lines = 0 if ids is None else len(ids)
    if ids is None:
        ids = attention = np.zeros((1, 4), np.int64)
    ids = np.concatenate([ids, np.zeros((pad_lines, ids.shape[1]), np.int64)])
    attention = np.concatenate([attention, np.zeros((pad_lines, attention.shape[1]), np.int64)])
    inputs = {"image": image[None], "input_ids": ids[None], "attention_mask": attention[None],
              "text_lines": np.array([lines], np.int64), "seed": np.array([seed], np.int64),
              "steps": np.array([steps], np.int64)}
    return fake_request(inputs)


def assert_same_detections(outputs: dict, row: int, expected) -> None:
    count = int(outputs["count"][row])
    assert count == len(expected)
    np.testing.assert_allclose(outputs["boxes"][row, :count], expected.boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(outputs["scores"][row, :count], expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["labels"][row, :count], expected.labels)


@pytest.mark.parametrize("texts,steps,pad_lines", [(TEXTS, 1, 0), ([], 1, 0), (TEXTS[:2], 2, 3)])
def test_stage_model_gives_the_client_stages_boxes(stage_repo, embedded, texts, steps, pad_lines):
    layout = RADMLayout(embedded)
    seed = fresh_seed()
    image, ids, attention = stage_case(layout, texts, seed)
    expected = layout.detect(image, ids, attention, seed, steps)
    assert len(expected), "the tiny RADM finds boxes on a random image (the comparison is not empty)"
    model = load_stage_model(stage_repo)
    (response,) = model.execute([stage_request(image, ids, attention, seed, steps, pad_lines)])
    assert response.error is None, response.error
    assert_same_detections(response.outputs, 0, expected)
    other = layout.detect(image, ids, attention, seed + 1, steps)
    assert len(other) != len(expected) or not np.allclose(other.boxes, expected.boxes), "the seed matters"


def test_steps_zero_means_the_bundles_sampling_steps(stage_repo, embedded):
    layout = RADMLayout(embedded)
    seed = fresh_seed()
    image, ids, attention = stage_case(layout, TEXTS, seed)
    (response,) = load_stage_model(stage_repo).execute([stage_request(image, ids, attention, seed, 0)])
    assert_same_detections(response.outputs, 0, layout.detect(image, ids, attention, seed, None))


def test_a_bad_request_is_answered_alone(stage_repo, embedded):
    layout = RADMLayout(embedded)
    seed = fresh_seed()
    image, ids, attention = stage_case(layout, TEXTS, seed)
    good = stage_request(image, ids, attention, seed, 1)
    too_many_lines = dict(good, text_lines=FakeTensor("text_lines", np.array([len(TEXTS) + 1], np.int64)))
    float_image = dict(good, image=FakeTensor("image", image[None].astype(np.float32)))
    odd_size = dict(good, image=FakeTensor("image", image[None, :, :200]))
    missing = {name: tensor for name, tensor in good.items() if name != "seed"}
    responses = load_stage_model(stage_repo).execute([too_many_lines, good, float_image, odd_size, missing])
    assert "'text_lines'" in str(responses[0].error) and "rows" in str(responses[0].error)
    assert responses[1].error is None and int(responses[1].outputs["count"][0]) >= 1
    assert "'image'" in str(responses[2].error) and "uint8" in str(responses[2].error)
    assert "'image'" in str(responses[3].error) and "multiple of 64" in str(responses[3].error)
    assert "missing input 'seed'" in str(responses[4].error)


# --- the repository folder --------------------------------------------------------------------
def test_stage_folder(bundle, stage_repo):
    folder = stage_repo / ll.NAME
    version = folder / "1"
    assert (version / "model.py").read_text() == (STUBS / "radm_layout.py").read_text()
    small = Bundle(version / BUNDLE_FOLDER)
    assert small.manifest == bundle.manifest
    for model in RADM:
        assert os.path.samefile(small.model_path(model), bundle.model_path(model)), "hardlinks, not copies"
    assert {p.name for p in small.root.glob("*.onnx")} == {Path(bundle.models[m].file).name for m in RADM}
    config = read_config(folder)
    contract = ll.contract(bundle)
    assert config.backend == "python" and [t.name for t in config.input] == contract.input_names
    assert not config.HasField("dynamic_batching"), "one request is one whole layout"
    assert config.instance_group[0].count == 2, "as many instances as radm_head, whose cost it is"
    assert config.parameters[STAGE_SHA256_PARAMETER].string_value == SERVER_STAGES[ll.NAME].identity(bundle)


def test_which_repositories_get_the_stage(bundle, tmp_path):
    from posterrt.runtime.triton import model_config as mc

    whole = build_repository(bundle, tmp_path / "whole", models=None)
    assert ll.NAME in {m.name for m in whole.server_loops}
    off = build_repository(bundle, tmp_path / "off", mc.ServingOptions(server_loops=False), models=RADM)
    assert not off.server_loops
    gpu = build_repository(bundle, tmp_path / "gpu", mc.ServingOptions(flavor="gpu-onnx"), models=RADM)
    assert not gpu.server_loops


# --- through a real tritonserver -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    repo = tmp_path_factory.mktemp("layout-served") / "repo"
    build_repository(bundle, repo, models=[*RADM, ll.NAME])
    server = start_server(repo)
    yield server
    server.stop()


@pytest.mark.triton
@pytest.mark.parametrize("protocol,texts", [("grpc", TEXTS), ("http", []), ("grpc", [])])
def test_layout_through_triton_uses_the_stage_and_lays_out_as_embedded(served, bundle, embedded, protocol, texts):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.layout import LayoutPipeline
    from posterrt.runtime.pipelines.request import PosterRequest

    rng = np.random.default_rng(fresh_seed())
    request = PosterRequest(product=rng.integers(0, 256, (96, 80, 3), dtype=np.uint8), texts=texts, size=(256, 320),
                            seed=fresh_seed())
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with TritonBackend(bundle, url) as triton:
        pipeline = LayoutPipeline(triton, progress=False)
        assert pipeline.layout.server_layout is not None, "the server serves radm_layout for this bundle"
        before = triton.servers[0].answered
        elements = pipeline(request).proposed
        assert triton.servers[0].answered == before, "no per-model call: the whole stage ran in the server"
    expected = LayoutPipeline(embedded, progress=False)(request).proposed
    assert LayoutPipeline(embedded, progress=False).layout.server_layout is None
    assert [e.cls for e in elements] == [e.cls for e in expected]
    np.testing.assert_allclose([e.box for e in elements], [e.box for e in expected], rtol=1e-5, atol=1e-3)


@pytest.mark.triton
def test_a_client_with_other_radm_settings_lays_out_itself(served, bundle, monkeypatch):
    """The settings hash guards the stage: a bundle whose RADM config differs does not use it."""
    from posterrt.runtime.backends.triton import TritonBackend

    with TritonBackend(bundle, served.grpc_url) as triton:
        assert triton.server_stage(ll.NAME) is not None
        monkeypatch.setitem(triton.bundle.config["radm"], "score_threshold", 0.5)
        assert triton.server_stage(ll.NAME) is None


@pytest.mark.triton
def test_the_streamed_stage_reports_each_step_in_order_and_lays_out_as_embedded(served, bundle, embedded):
    from posterrt.runtime.backends.triton import TritonBackend
    from posterrt.runtime.pipelines.layout import LayoutPipeline
    from posterrt.runtime.pipelines.request import PosterRequest
    from posterrt.runtime.progress import RunControl, controlled

    rng = np.random.default_rng(fresh_seed())
    request = PosterRequest(product=rng.integers(0, 256, (96, 80, 3), dtype=np.uint8), texts=TEXTS, size=(256, 320),
                            layout_steps=4, seed=fresh_seed())
    events = []
    with TritonBackend(bundle, served.grpc_url) as triton:
        pipeline = LayoutPipeline(triton, progress=False)
        assert pipeline.layout.server_layout.streaming, "gRPC: the streamed radm_layout"
        with controlled(RunControl(events.append)):
            elements = pipeline(request).elements
    assert [(e.stage, e.step, e.total) for e in events] == [("layout", step, 4) for step in range(1, 5)]
    expected = LayoutPipeline(embedded, progress=False)(request).elements
    np.testing.assert_allclose([e.box for e in elements], [e.box for e in expected], rtol=1e-5, atol=1e-3)
