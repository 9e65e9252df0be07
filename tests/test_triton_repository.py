"""The Triton model repository: configs from the contracts (parsed with Triton's own protobuf schema),
the files of each flavor, the client's half of a bundle, and the generic Python-backend model run
in-process with a stand-in for Triton's ``pb_utils``. No server here (see test_triton_server.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from posterrt.runtime import cli
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import CONTRACTS, DYNAMIC_DIMS, EPILOGUE, validate_inputs
from posterrt.runtime.errors import BundleError, ContractError, InputError
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.triton import model_config as mc
from posterrt.runtime.triton.repository import MODEL_TEMPLATE, build_repository, write_client_bundle

from helpers_triton import export_served_bundle

WIRE_TO_CONFIG = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64}


def resolved(name):
    """A contract with made-up static sizes: configs do not depend on their values."""
    contract = CONTRACTS[name]
    return contract.resolve({dim: 8 for dim in contract.static_dims})


def parsed(contract, options=None, parameters=None) -> pb.ModelConfig:
    text = mc.to_pbtxt(mc.build_model_config(contract, options or mc.ServingOptions(), parameters))
    return text_format.Parse(text, pb.ModelConfig())


# --- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONTRACTS))
def test_config_tensors_follow_the_contract(name):
    contract = resolved(name)
    config = parsed(contract)
    assert config.name == name
    assert config.max_batch_size == DYNAMIC_DIMS[contract.batch_dim].max
    for specs, tensors in ((contract.inputs, config.input), (contract.outputs, config.output)):
        assert [t.name for t in tensors] == [s.name for s in specs]
        for spec, tensor in zip(specs, tensors):
            assert tensor.data_type == WIRE_TO_CONFIG[spec.dtype]
            if len(spec.shape) == 1:  # [batch] only: dims [1] reshaped to []
                assert list(tensor.dims) == [1] and tensor.HasField("reshape") and list(tensor.reshape.shape) == []
            else:
                expected = [-1 if isinstance(s, str) else s for s in spec.shape[1:]]
                assert list(tensor.dims) == expected and not tensor.HasField("reshape")


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_default_batching_by_role(name):
    contract = resolved(name)
    config = parsed(contract)
    if contract.role == EPILOGUE:
        assert not config.HasField("dynamic_batching")
    else:
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == 0  # batches form in the queue under load
        assert list(config.dynamic_batching.preferred_batch_size) == []


def test_batching_options():
    head = resolved("plannet_denoiser")
    off = parsed(head, mc.ServingOptions(dynamic_batching=False))
    assert not off.HasField("dynamic_batching")
    tuned = parsed(resolved("vae_decoder"), mc.ServingOptions(dynamic_batching=True, max_queue_delay_us=50,
                                                               preferred_batch_sizes=(2, 4)))
    assert tuned.dynamic_batching.max_queue_delay_microseconds == 50
    assert list(tuned.dynamic_batching.preferred_batch_size) == [2, 4]
    with pytest.raises(InputError, match="preferred-batch-sizes.*outside 1..4"):
        mc.build_model_config(head, mc.ServingOptions(preferred_batch_sizes=(8,)))
    for bad in (dict(flavor="tpu"), dict(instances=0), dict(gpu_accelerator="openvino"), dict(trt_precision="int4"),
                dict(max_queue_delay_us=-1)):
        with pytest.raises(InputError):
            mc.ServingOptions(**bad)


def test_cpu_flavor_is_the_python_backend_with_thread_parameters():
    config = parsed(resolved("bg_unet"), mc.ServingOptions(intra_op_threads=2), {"posterrt_onnx_sha256": "abc"})
    assert config.backend == "python" and not config.platform
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters == {"intra_op_thread_count": "2", "inter_op_thread_count": "1", "posterrt_onnx_sha256": "abc"}


def test_instance_counts_per_model():
    """radm_head (cost linear in the batch) and plannet_denoiser (one stub the serial part under
    load) get a second instance on the cpu flavor by default; --instances sets every model,
    --model-instances one model over it."""
    def count(name, **options):
        (group,) = parsed(resolved(name), mc.ServingOptions(**options)).instance_group
        return group.count

    assert count("radm_head") == 2 and count("plannet_denoiser") == 2 and count("bg_unet") == 1
    assert count("radm_text_encoder") == 1 and count("plannet_denoiser", flavor="gpu-trt") == 1
    assert count("radm_head", flavor="gpu-onnx") == 1
    assert count("radm_head", instances=1) == 1 and count("bg_unet", instances=3) == 3
    assert count("bg_unet", instances=3, model_instances={"bg_unet": 1}) == 1
    with pytest.raises(InputError, match="--model-instances: counts must be integers >= 1"):
        mc.ServingOptions(model_instances={"radm_head": 0})


def test_thread_counts_per_model():
    def threads(name, **options):
        config = parsed(resolved(name), mc.ServingOptions(**options))
        return config.parameters["intra_op_thread_count"].string_value

    assert threads("bg_unet") == "1" and threads("bg_unet", intra_op_threads=2) == "2"
    assert threads("bg_unet", model_threads={"bg_unet": 2}) == "2" and threads("plannet_denoiser", model_threads={"bg_unet": 2}) == "1"
    with pytest.raises(InputError, match="--model-threads: counts must be integers >= 1"):
        mc.ServingOptions(model_threads={"bg_unet": 0})


def test_gpu_onnx_flavor_uses_tensorrt_with_contract_profiles():
    contract = resolved("bg_unet")
    config = parsed(contract, mc.ServingOptions(flavor="gpu-onnx", instances=2))
    assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 2)]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    settings = dict(accelerator.parameters)
    assert settings["precision_mode"] == "FP16" and settings["trt_engine_cache_enable"] == "1"
    for kind in ("min", "opt", "max"):
        profile = dict(item.split(":") for item in settings[f"trt_profile_{kind}_shapes"].split(","))
        sizes = {name: getattr(rng, kind) for name, rng in DYNAMIC_DIMS.items()}
        assert list(profile) == contract.input_names
        for spec in contract.inputs:  # each shape satisfies the contract at that end of the range
            assert tuple(int(d) for d in profile[spec.name].split("x")) == spec.concrete_shape(sizes)
    cuda = parsed(contract, mc.ServingOptions(flavor="gpu-onnx", gpu_accelerator="cuda"))
    (accelerator,) = cuda.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "cuda" and not accelerator.parameters


def test_gpu_trt_flavor_is_a_tensorrt_plan():
    config = parsed(resolved("radm_head"), mc.ServingOptions(flavor="gpu-trt"))
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert not config.HasField("optimization")


def test_wire_shapes_round_trip():
    timestep = CONTRACTS["bg_unet"].input("timestep")
    array = np.arange(3, dtype=np.float32)
    assert mc.to_wire(timestep, array).shape == (3, 1) and mc.triton_shape(timestep) == [-1, 1]
    assert np.array_equal(mc.from_wire(timestep, mc.to_wire(timestep, array)), array)
    assert mc.triton_shape(resolved("bg_unet").input("sample")) == [-1, 8, -1, -1]


# --- the repository on disk ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """PlanNet alone: two small real models, quick to export."""
    return export_served_bundle(tmp_path_factory.mktemp("repo-bundle") / "tiny", families=("plannet",))


def read_config(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def test_cpu_repository_layout(small_bundle, tmp_path):
    bundle = Bundle(small_bundle)
    report = build_repository(bundle, tmp_path / "repo")
    assert [m.name for m in report.models] == list(bundle.models) and not report.missing_plans
    for name, entry in bundle.models.items():
        folder = tmp_path / "repo" / name
        config = read_config(folder)
        assert config.name == name and config.backend == "python"
        assert config.parameters[mc.ONNX_SHA256_PARAMETER].string_value == entry.sha256
        version = folder / "1"
        assert sorted(p.name for p in version.iterdir()) == ["contract.json", "model.onnx", "model.py"]
        # hardlinked, not copied: paper-size weights must not be duplicated
        assert os.path.samefile(version / "model.onnx", bundle.model_path(name))
        assert (version / "model.py").read_text() == MODEL_TEMPLATE.read_text()
        document = json.loads((version / "contract.json").read_text())
        contract = bundle.contract(name)
        assert document["model"] == name and document["static_dims"] == entry.static_dims
        assert [t["name"] for t in document["inputs"]] == contract.input_names
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_rebuild_replaces_only_the_named_models(small_bundle, tmp_path):
    repo = tmp_path / "repo"
    build_repository(small_bundle, repo)
    (repo / "README.md").write_text("kept")
    stale = repo / "plannet_encoder" / "1" / "stale.txt"
    stale.write_text("old")
    build_repository(small_bundle, repo, mc.ServingOptions(dynamic_batching=False), models=["plannet_encoder"])
    assert not stale.exists() and (repo / "README.md").read_text() == "kept"
    assert not read_config(repo / "plannet_encoder").HasField("dynamic_batching")
    assert read_config(repo / "plannet_denoiser").HasField("dynamic_batching")  # untouched


def test_gpu_flavors_on_disk(small_bundle, tmp_path):
    onnx = build_repository(small_bundle, tmp_path / "onnx", mc.ServingOptions(flavor="gpu-onnx"))
    assert not onnx.missing_plans
    assert sorted(p.name for p in (tmp_path / "onnx" / "plannet_denoiser" / "1").iterdir()) == ["model.onnx"]

    no_engines = build_repository(small_bundle, tmp_path / "trt", mc.ServingOptions(flavor="gpu-trt"))
    assert sorted(no_engines.missing_plans) == ["plannet_denoiser", "plannet_encoder"]
    assert all("posterrt engines build" in m.note for m in no_engines.models)
    # the path to copy a plan to is the one that stays, not the staging folder the build wrote in
    final = tmp_path / "trt" / "plannet_encoder" / "1" / "model.plan"
    note = next(m.note for m in no_engines.models if m.name == "plannet_encoder")
    assert f"copy it to {final}" in note and ".staging" not in note and "--engines" in note
    assert read_config(tmp_path / "trt" / "plannet_encoder").platform == "tensorrt_plan"  # config still written

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "plannet_denoiser.plan").write_bytes(b"serialized engine bytes")
    partial = build_repository(small_bundle, tmp_path / "trt2", mc.ServingOptions(flavor="gpu-trt"), engines=engines)
    assert partial.missing_plans == ["plannet_encoder"]
    assert (tmp_path / "trt2" / "plannet_denoiser" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    with pytest.raises(InputError, match="--engines"):
        build_repository(small_bundle, tmp_path / "trt3", mc.ServingOptions(flavor="gpu-trt"), engines=tmp_path / "none")


def test_gpu_trt_follows_the_engines_manifest(small_bundle, tmp_path):
    """A plan built with a narrower batch profile caps max_batch_size; a plan built from another
    export of the model is not served."""
    bundle = Bundle(small_bundle)
    engines = tmp_path / "engines"
    engines.mkdir()
    for name in bundle.models:
        (engines / f"{name}.plan").write_bytes(b"engine")
    records = {
        "plannet_denoiser": {"plan": "plannet_denoiser.plan", "ranges": {"batch": {"min": 1, "opt": 1, "max": 2}},
                             "source_onnx_sha256": bundle.models["plannet_denoiser"].sha256},
        "plannet_encoder": {"source_onnx_sha256": "f" * 64},
    }
    (engines / "manifest.json").write_text(json.dumps({"format": "posterrt-engines", "version": 1, "engines": records}))
    report = build_repository(bundle, tmp_path / "trt", mc.ServingOptions(flavor="gpu-trt"), engines=engines)
    assert report.missing_plans == ["plannet_encoder"]
    assert "another export" in next(m.note for m in report.models if m.name == "plannet_encoder")
    assert not (tmp_path / "trt" / "plannet_encoder" / "1" / "model.plan").exists()
    assert read_config(tmp_path / "trt" / "plannet_denoiser").max_batch_size == 2


def test_repository_refuses_an_edited_model(small_bundle, tmp_path):
    copy = tmp_path / "bundle"
    copy.mkdir()
    for item in small_bundle.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    (copy / "tokenizers").mkdir()
    with open(copy / "plannet_denoiser.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        build_repository(copy, tmp_path / "repo")


def test_client_bundle_holds_manifest_and_tokenizers_only(small_bundle, tmp_path):
    client = Bundle(write_client_bundle(small_bundle, tmp_path / "client"))
    full = Bundle(small_bundle)
    assert client.manifest == full.manifest
    for relative in full.manifest["assets"].values():
        assert (tmp_path / "client" / relative).read_bytes() == (small_bundle / relative).read_bytes()
    assert client.contract("plannet_denoiser") == full.contract("plannet_denoiser")
    assert not list((tmp_path / "client").glob("*.onnx"))
    with pytest.raises(BundleError, match="is missing"):
        client.model_path("plannet_denoiser")


def test_repo_build_command(small_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    code = cli.main(["repo", "build", "--bundle", str(small_bundle), "--out", str(out), "--models", "plannet_denoiser",
                     "--queue-delay-us", "123", "--client-bundle", str(tmp_path / "client")])
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["plannet_denoiser"]
    assert read_config(out / "plannet_denoiser").dynamic_batching.max_queue_delay_microseconds == 123
    assert (tmp_path / "client" / "manifest.json").is_file()
    code = cli.main(["repo", "build", "--bundle", str(small_bundle), "--out", str(out), "--models", "plannet_denoiser",
                     "--model-instances", "plannet_denoiser=3"])
    assert code == 0, capsys.readouterr().err
    assert read_config(out / "plannet_denoiser").instance_group[0].count == 3
    for flag in ("--model-instances", "--model-threads"):
        for bad, words in (("plannet_denoiser=two", "expected a whole number >= 1"), ("plannet_denoiser", "MODEL=N"),
                           ("nope=2", "unknown model 'nope'")):
            code = cli.main(["repo", "build", "--bundle", str(small_bundle), "--out", str(out), flag, bad])
            err = capsys.readouterr().err
            assert code == 2 and words in err and flag in err
    code = cli.main(["repo", "build", "--bundle", str(small_bundle), "--out", str(out), "--models", "bg_unet"])
    assert code == 2 and "--models: ['bg_unet'] are not in bundle" in capsys.readouterr().err
    code = cli.main(["repo", "build", "--bundle", str(small_bundle), "--out", str(out), "--flavor", "gpu-trt"])
    assert code == 1 and "PLAN MISSING" in capsys.readouterr().out


# --- the generic Python-backend model, in-process ------------------------------------------
class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeError(Exception):
    pass


@pytest.fixture(scope="module")
def model_module():
    """model.py loaded as Triton's stub would, with a stand-in for ``triton_python_backend_utils``."""
    fake = types.SimpleNamespace(Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=FakeError,
                                 get_input_tensor_by_name=lambda request, name: request.get(name))
    spec = importlib.util.spec_from_file_location("posterrt_triton_model_under_test", MODEL_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.pb_utils = fake
    return module


class CountingSession:
    """Wraps the ORT session to count calls and record batch sizes."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, inputs):
        self.batches.append(next(iter(inputs.values())).shape[0])
        return self.session.run(names, inputs)


@pytest.fixture()
def served_model(model_module, small_bundle, tmp_path):
    repo = tmp_path / "repo"
    build_repository(small_bundle, repo, models=["plannet_denoiser"])
    config = json.loads(json.dumps({"parameters": {"intra_op_thread_count": {"string_value": "1"}}}))
    model = model_module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "plannet_denoiser"),
                      "model_version": "1"})
    model.session = CountingSession(model.session)
    return model


def requests_for(contract, seeds, sizes):
    return [{k: FakeTensor(k, v) for k, v in sample_inputs(contract, sizes, seed).items()} for seed in seeds]


def test_model_batches_requests_into_one_call_and_splits_results(served_model, small_bundle):
    import onnxruntime as ort

    bundle = Bundle(small_bundle)
    contract = bundle.contract("plannet_denoiser")
    sizes = default_sizes("small")
    good = requests_for(contract, [1, 2, 3], sizes)
    bad = {k: FakeTensor(k, v.copy()) for k, v in sample_inputs(contract, sizes, 4).items()}
    bad["memory"].as_numpy()[0, 0, 0] = np.nan
    other_shape = requests_for(contract, [5], {**sizes, "memory_tokens": sizes["memory_tokens"] + 1})
    responses = served_model.execute([good[0], bad, good[1], other_shape[0], good[2]])

    assert served_model.session.batches == [3, 1], "same shapes batched, the other shape on its own"
    assert responses[1].error is not None and "NaN" in str(responses[1].error)
    reference = ort.InferenceSession(str(bundle.model_path("plannet_denoiser")))
    for response, request in zip([responses[i] for i in (0, 2, 3, 4)], good[:2] + other_shape + good[2:]):
        assert response.error is None
        inputs = {k: t.as_numpy() for k, t in request.items()}
        (expected,) = reference.run(None, inputs)
        np.testing.assert_allclose(response.outputs["logits"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_model_answers_every_kind_of_bad_request_on_its_own(served_model, small_bundle):
    contract = Bundle(small_bundle).contract("plannet_denoiser")
    sizes = default_sizes("small")

    def request(**changes):
        arrays = sample_inputs(contract, sizes, 9)
        arrays.update(changes)
        return {k: FakeTensor(k, v) for k, v in arrays.items() if v is not None}

    base = sample_inputs(contract, sizes, 9)
    bad = [
        request(tokens=base["tokens"].astype(np.int32)),  # dtype
        request(memory=base["memory"][:, :, :-1]),  # static size
        request(tokens=np.full_like(base["tokens"], 10_000)),  # id past the vocabulary
        request(timestep=np.array([5000.0], np.float32)),  # out of the timestep range
        request(memory_mask=None),  # missing input
    ]
    responses = served_model.execute(bad + [request()])
    assert all(r.error is not None for r in responses[:-1]), [r.error for r in responses]
    assert responses[-1].error is None and served_model.session.batches == [1]


def test_numpy_fallback_validation_agrees_with_the_contracts(model_module, small_bundle, tmp_path):
    """model.py checks requests with numpy alone where posterrt is not installed (a stock Triton
    container); it must accept and refuse exactly what validate_inputs does."""
    from posterrt.runtime.triton.repository import contract_document

    bundle = Bundle(small_bundle)
    for name in bundle.models:
        contract = bundle.contract(name)
        document = contract_document(contract, bundle.models[name].static_dims)
        base = sample_inputs(contract, default_sizes("other"), 0)
        cases = [base]
        for spec in contract.inputs:
            array = base[spec.name]
            cases.append({**base, spec.name: array.astype(np.float64 if array.dtype.kind == "f" else np.int32)})
            cases.append({**base, spec.name: array[..., None]})
            if array.dtype.kind == "f":
                poisoned = array.copy()
                poisoned.flat[0] = np.inf
                cases.append({**base, spec.name: poisoned})
            if spec.high is not None:
                cases.append({**base, spec.name: np.full_like(array, spec.high + 1)})
            if array.ndim >= 2:  # a dynamic or fixed axis one too long
                cases.append({**base, spec.name: np.concatenate([array, array[:, -1:]], axis=1)})
        for case in cases:
            try:
                validate_inputs(contract, case)
                expected = None
            except ContractError as error:
                expected = str(error)
            try:
                model_module.check_inputs(document, case)
                got = None
            except model_module.RequestError as error:
                got = str(error)
            assert (expected is None) == (got is None), (name, expected, got)


def test_model_template_does_not_need_posterrt(tmp_path):
    """The stub of a stock Triton container has no posterrt: model.py must import without it."""
    import subprocess

    code = ("import sys, importlib.util\n"
            "sys.modules['posterrt'] = None\n"  # any import of posterrt fails
            f"spec = importlib.util.spec_from_file_location('m', {str(MODEL_TEMPLATE)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "doc = {'model': 'x', 'contract_version': 1, 'static_dims': {}, 'inputs': [], 'outputs': [], 'ranges': {}}\n"
            "v = m.contract_validator(doc); v({}); print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
