"""Optimized CPU variants in the Triton repository (`posterrt repo build --variants`): the files
each variant is served from and what the repository records about it, a real tritonserver serving
an OpenVINO bf16 IR and an int8 ONNX variant with the numbers of the same files in-process, the
refusals, and the generic model.py's OpenVINO import (telemetry off, one clear error without it)."""
from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

if importlib.util.find_spec("openvino") is None:
    pytest.skip("the openvino extra is not installed", allow_module_level=True)

from posterrt.engines import ort_optimize
from posterrt.runtime import cli
from posterrt.runtime.backends.openvino import OpenVinoSession, write_ir
from posterrt.runtime.backends.triton import TritonBackend
from posterrt.runtime.bundle import MANIFEST, Bundle, sha256_file
from posterrt.runtime.errors import BundleError, InputError
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.triton import model_config as mc
from posterrt.runtime.triton import repository
from posterrt.runtime.triton.repository import MODEL_TEMPLATE, build_repository

from helpers_bundle import linked_bundle_copy
from helpers_triton import start_server

pytestmark = pytest.mark.triton

#: the variants served here: an OpenVINO IR and an ONNX Runtime one, one model each
VARIANTS = {"bg_unet": "openvino-bf16", "render_unet": "int8-dynamic"}
#: The server and the in-process session run the same file with the same engine, precision and
#: thread count (1) on the same CPU, so the kernels and their summation order are the same: the
#: results should be identical; 1e-6 of the output's scale leaves room for nothing else.
REL_TOL = 1e-6


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle, tmp_path_factory):
    """A copy of the shared tiny bundle (variants are written into a bundle, the shared one is never
    written) with both variants."""
    folder = linked_bundle_copy(tiny_bundle, tmp_path_factory.mktemp("variants") / "tiny")
    for model, variant in VARIANTS.items():
        ort_optimize.optimize_bundle(folder, variant, [model], progress=lambda _: None)
    return folder


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return Bundle(bundle_dir)


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants-repo") / "model_repository"
    build_repository(bundle, out, models=list(VARIANTS), variants=VARIANTS)
    return out


@pytest.fixture(scope="module")
def server(repo):
    server = start_server(repo)
    yield server
    server.stop()


def read_config(folder) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))


# --- the repository on disk ------------------------------------------------------------------
def test_variant_files_and_what_the_repository_records(bundle, repo):
    for model, variant in VARIANTS.items():
        entry = bundle.variants(model)[variant]
        version = repo / model / "1"
        document = json.loads((version / repository.CONTRACT_FILE).read_text())
        recorded = document["variant"]
        assert recorded["name"] == variant and recorded["file"] == entry["file"]
        assert recorded["sha256"] == entry["sha256"] == sha256_file(bundle.root / entry["file"])
        assert recorded["source_sha256"] == bundle.models[model].sha256  # made from the export the bundle holds
        assert recorded["data_sha256"] == entry["data_sha256"]
        parameters = {k: v.string_value for k, v in read_config(repo / model).parameters.items()}
        assert parameters[repository.VARIANT_PARAMETER] == variant
        assert parameters[repository.VARIANT_SHA256_PARAMETER] == entry["sha256"]
        # the export's hash stays: a client holding the bundle still recognizes the model
        assert parameters[mc.ONNX_SHA256_PARAMETER] == bundle.models[model].sha256

    ir = repo / "bg_unet" / "1"
    assert sorted(p.name for p in ir.iterdir()) == ["contract.json", "model.bin", "model.py", "model.xml"]
    assert os.path.samefile(ir / "model.xml", bundle.root / "bg_unet.openvino-bf16.xml")
    assert os.path.samefile(ir / "model.bin", bundle.root / "bg_unet.openvino-bf16.bin")
    assert json.loads((ir / "contract.json").read_text())["model_file"] == "model.xml"
    assert (ir / "model.py").read_text() == MODEL_TEMPLATE.read_text()
    # renamed as a pair, the IR still finds its weights and its precision
    assert OpenVinoSession(ir / "model.xml", threads=1).precision == "bf16"

    onnx = repo / "render_unet" / "1"
    assert sorted(p.name for p in onnx.iterdir()) == ["contract.json", "model.onnx", "model.py"]
    assert os.path.samefile(onnx / "model.onnx", bundle.model_path("render_unet", variant="int8-dynamic"))
    assert json.loads((onnx / "contract.json").read_text())["model_file"] == "model.onnx"


def test_repo_build_command_prints_the_served_variants(bundle_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    code = cli.main(["repo", "build", "--bundle", str(bundle_dir), "--out", str(out), "--models", "bg_unet,render_unet",
                     "--variants", "bg_unet=openvino-bf16,render_unet=int8-dynamic"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "(variant openvino-bf16, sha256 " in printed.out and ", openvino)" in printed.out
    assert "(variant int8-dynamic, sha256 " in printed.out and ", onnxruntime)" in printed.out
    assert (out / "bg_unet" / "1" / "model.xml").is_file()


def test_refusals_name_the_flag_and_write_nothing(bundle, bundle_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    with pytest.raises(InputError, match=r"--variants: .*cpu flavor only.*got --flavor gpu-onnx"):
        build_repository(bundle, out, mc.ServingOptions(flavor="gpu-onnx"), models=["bg_unet"], variants=VARIANTS)
    with pytest.raises(InputError, match=r"--variants: \['bg_unet'\] are not among the models this build writes "
                                         r"\(render_unet\); add them to --models"):
        build_repository(bundle, out, models=["render_unet"], variants=VARIANTS)
    with pytest.raises(BundleError, match=r"model 'bg_unet' has no variant 'int8' \(it has \['openvino-bf16'\]\)"):
        build_repository(bundle, out, models=list(VARIANTS), variants={"render_unet": "int8-dynamic", "bg_unet": "int8"})
    assert not out.exists() or not list(out.iterdir()), "a refused build wrote folders"

    for argv, message in (
        (["--flavor", "gpu-trt", "--variants", "bg_unet=openvino-bf16"], "--variants: optimized variants are served by "
                                                                          "the cpu flavor only"),
        (["--models", "bg_unet", "--variants", "bg_unet=fp16"], "has no variant 'fp16'"),
        (["--models", "bg_unet", "--variants", "bg_unet"], "--variants: got 'bg_unet', expected MODEL=VARIANT"),
        (["--models", "render_unet", "--variants", "bg_unet=openvino-bf16"], "are not among the models this build"),
    ):
        code = cli.main(["repo", "build", "--bundle", str(bundle_dir), "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_stale_variant_is_refused(bundle_dir, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(bundle_dir, stale, copy_function=os.link)
    manifest = json.loads((stale / MANIFEST).read_text())
    manifest["variants"]["bg_unet"]["openvino-bf16"]["source_sha256"] = "0" * 64
    (stale / MANIFEST).unlink()  # a hardlink: replace it, never write through it
    (stale / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="made from another export"):
        build_repository(stale, tmp_path / "repo", models=["bg_unet"], variants={"bg_unet": "openvino-bf16"})


# --- the server ------------------------------------------------------------------------------
def test_server_returns_what_the_variant_returns_in_process(server, bundle):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    in_process = {
        "bg_unet": OpenVinoSession(bundle.model_path("bg_unet", variant="openvino-bf16"), threads=1),
        "render_unet": ort.InferenceSession(str(bundle.model_path("render_unet", variant="int8-dynamic")), options,
                                            providers=["CPUExecutionProvider"]),
    }
    seed = int.from_bytes(os.urandom(2), "little")
    with TritonBackend(bundle, server.grpc_url, models=list(VARIANTS)) as backend:
        for model, session in in_process.items():
            contract = bundle.contract(model)
            fp32 = ort.InferenceSession(str(bundle.model_path(model)), options, providers=["CPUExecutionProvider"])
            for kind in ("small", "other"):
                inputs = sample_inputs(contract, default_sizes(kind), seed)
                served = backend.run(model, inputs)
                expected = dict(zip(contract.output_names, session.run(contract.output_names, inputs)))
                for name, want in expected.items():
                    error = relative_error(served[name], want)
                    assert error <= REL_TOL, f"{model} {kind} seed {seed} {name}: {error:.2e}"
                    # and it is the variant that answered, not the fp32 export
                    export = fp32.run([name], inputs)[0]
                    assert relative_error(served[name], export) > 1e-4, f"{model} served the fp32 numbers"


def test_bad_requests_are_still_refused_one_by_one(server, bundle):
    """Validation is the same for the OpenVINO model: a NaN is refused on its own response."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    contract = bundle.contract("bg_unet")
    good = sample_inputs(contract, default_sizes("small"), 1)
    client = grpcclient.InferenceServerClient(server.grpc_url.split("://")[1])

    def send(arrays):
        items = []
        for spec in contract.inputs:
            array = mc.to_wire(spec, arrays[spec.name])
            item = grpcclient.InferInput(spec.name, list(array.shape), mc.WIRE_DTYPES[spec.dtype])
            item.set_data_from_numpy(array)
            items.append(item)
        return client.infer("bg_unet", items)

    try:
        nan = good["sample"].copy()
        nan.flat[0] = np.nan
        with pytest.raises(InferenceServerException, match="'sample': contains NaN or Inf"):
            send({**good, "sample": nan})
        assert send(good).as_numpy("noise_pred").shape == good["sample"].shape  # still serving
    finally:
        client.close()


# --- the generic model.py's OpenVINO import --------------------------------------------------
def load_model_module(name: str):
    spec = importlib.util.spec_from_file_location(name, MODEL_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_without_openvino_fails_at_load_with_one_line(repo, monkeypatch):
    module = load_model_module("posterrt_triton_model_without_openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if not installed
    model = module.TritonPythonModel()
    with pytest.raises(ImportError, match=r"model.xml is an OpenVINO IR and the `openvino` package is not installed") as error:
        model.initialize({"model_config": json.dumps({"parameters": {}}), "model_repository": str(repo / "bg_unet"),
                          "model_version": "1"})
    assert "\n" not in str(error.value)


def test_model_imports_openvino_without_telemetry_and_without_posterrt(repo, tmp_path):
    """As test_openvino_variants checks for posterrt's import, for the stand-alone copy in model.py,
    run the way a stock Triton stub would (no posterrt): the IR compiles at the precision it records."""
    code = ("import sys, importlib.util\n"
            "sys.modules['posterrt'] = None\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(MODEL_TEMPLATE)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"model = m.OpenVinoModel(m.Path({str(repo / 'bg_unet' / '1' / 'model.xml')!r}), threads=1)\n"
            "print(model.precision, model.compiled.get_property('INFERENCE_PRECISION_HINT'),\n"
            "      sys.modules.get('openvino_telemetry') is not None, sep='|')\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # under CI=true openvino would stay quiet anyway: test the developer's case
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    precision, hint, telemetry = result.stdout.strip().split("|")
    assert precision == "bf16" and "bfloat16" in hint and telemetry == "False"
    assert not (tmp_path / "intel").exists()  # no telemetry client id was written


# --- the server-side PlanNet loop and a variant of its denoiser --------------------------------
def register(bundle_dir, model: str, variant: str, write) -> None:
    """A variant entry written by hand (the gates are UNet-only, so `engines optimize` makes no
    plannet_denoiser variant): ``write(target)`` makes the real file, hashes as optimize_bundle does."""
    name = ort_optimize.variant_file(model, variant)
    write(bundle_dir / name)
    manifest_path = bundle_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    data_files = [p.name for p in bundle_dir.glob(f"{model}.{variant}.*") if p.name != name]
    manifest.setdefault("variants", {}).setdefault(model, {})[variant] = {
        "file": name, "sha256": sha256_file(bundle_dir / name), "data_files": data_files,
        "data_sha256": {d: sha256_file(bundle_dir / d) for d in data_files},
        "source_sha256": manifest["models"][model]["sha256"]}
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(manifest))


def test_sampling_loop_follows_an_onnx_denoiser_variant_and_leaves_out_an_openvino_one(bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy, copy_function=os.link)
    source = copy / "plannet_denoiser.onnx"
    register(copy, "plannet_denoiser", "int8-dynamic", lambda target: ort_optimize.build_int8_dynamic(source, target))
    register(copy, "plannet_denoiser", "openvino-fp32", lambda target: write_ir(source, target, "f32"))
    bundle = Bundle(copy)

    onnx = build_repository(bundle, tmp_path / "onnx", variants={"plannet_denoiser": "int8-dynamic"})
    (loop,) = [loop for loop in onnx.server_loops if loop.name == "plannet_sampler"]
    assert loop.name == "plannet_sampler" and loop.variant["name"] == "int8-dynamic"
    staged = Bundle(loop.folder / "1" / "bundle")
    assert os.path.samefile(staged.model_path("plannet_denoiser", variant="int8-dynamic"),
                            copy / "plannet_denoiser.int8-dynamic.onnx")
    served = read_config(loop.folder).parameters[mc.STAGE_VARIANTS_PARAMETER].string_value
    assert json.loads(served) == {"plannet_denoiser": "int8-dynamic"}

    ir = build_repository(bundle, tmp_path / "ir", variants={"plannet_denoiser": "openvino-fp32"})
    assert "plannet_sampler" not in [loop.name for loop in ir.server_loops]
    assert not (tmp_path / "ir" / "plannet_sampler").exists()
    assert "plannet_sampler not written" in ir.notes[0] and "once per step" in ir.notes[0]
    assert (tmp_path / "ir" / "plannet_denoiser" / "1" / "model.xml").is_file()
    with pytest.raises(InputError, match="leave plannet_sampler out of --models"):
        build_repository(bundle, tmp_path / "ir2", models=["plannet_denoiser", "plannet_sampler"],
                         variants={"plannet_denoiser": "openvino-fp32"})


def test_unet_loop_runs_the_variant_its_unet_serves(bundle_dir, tmp_path):
    """bg_unet_sampler runs what bg_unet serves: an OpenVINO IR variant as model.xml + model.bin, and the
    same variant of bg_unet's cached steps (refused, naming the command, while the bundle lacks them)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy, copy_function=os.link)
    register(copy, "bg_unet", "openvino-fp32", lambda target: write_ir(copy / "bg_unet.onnx", target, "f32"))
    with pytest.raises(BundleError, match=r"no 'openvino-fp32' of bg_unet_deep; build them with `posterrt engines "
                                          r"optimize --bundle .* --variant openvino-fp32 --models bg_unet_deep,bg_unet_shallow`"):
        build_repository(Bundle(copy), tmp_path / "refused", models=["bg_unet", "bg_unet_sampler"],
                         variants={"bg_unet": "openvino-fp32"})
    for step in ("bg_unet_deep", "bg_unet_shallow"):
        register(copy, step, "openvino-fp32", lambda target: write_ir(copy / f"{step}.onnx", target, "f32"))
    report = build_repository(Bundle(copy), tmp_path / "repo",
                              models=["bg_unet", "bg_unet_deep", "bg_unet_shallow", "bg_unet_sampler"],
                              variants={"bg_unet": "openvino-fp32"})
    for step in ("bg_unet_deep", "bg_unet_shallow"):  # served models and the loop's own copies: the variant
        assert os.path.samefile(tmp_path / "repo" / step / "1" / "model.xml", copy / f"{step}.openvino-fp32.xml")
        assert os.path.samefile(report.server_loops[0].folder / "1" / "bundle" / f"{step}.openvino-fp32.xml",
                                copy / f"{step}.openvino-fp32.xml")
    loop, stream = report.server_loops
    assert stream.name == "bg_unet_sampler_stream" and stream.variant["name"] == "openvino-fp32"
    assert loop.name == "bg_unet_sampler" and loop.variant["name"] == "openvino-fp32"
    version = loop.folder / "1"
    staged = Bundle(version / "bundle").model_path("bg_unet", variant="openvino-fp32")
    assert staged.suffix == ".xml" and staged.with_suffix(".bin").is_file()
    assert filecmp.cmp(staged, tmp_path / "repo" / "bg_unet" / "1" / "model.xml", shallow=False)
    served = read_config(loop.folder).parameters[mc.STAGE_VARIANTS_PARAMETER].string_value
    assert json.loads(served) == {"bg_unet": "openvino-fp32"}
