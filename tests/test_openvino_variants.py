"""OpenVINO variants on the tiny preset: the IR is written only after the gates, keeps export parity
at f32, runs at bf16 when it says so, the embedded backend serves it like any other variant, and
NNCF's int8 IR is quantized as documented and judged by the same gates."""
from __future__ import annotations

import json
import os
import shutil
import threading

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("openvino") is None:
    pytest.skip("the openvino extra is not installed", allow_module_level=True)

from posterrt.engines import ort_optimize
from posterrt.engines import quality_gate
from posterrt.engines.quality_gate import APPROXIMATE, EXACT
from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.backends.openvino import PRECISION_KEY, OpenVinoSession, import_openvino, ir_precision, write_ir
from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.errors import BundleError, InputError, ParityError
from posterrt.runtime.samples import default_sizes, sample_inputs

MODEL = "bg_unet"


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openvino") / "tiny"
    shutil.copytree(tiny_bundle, folder)
    return folder


@pytest.fixture(scope="module")
def fp32_variant(bundle_dir):
    return ort_optimize.optimize_bundle(bundle_dir, "openvino-fp32", [MODEL], progress=lambda _: None)[MODEL]


@pytest.fixture(scope="module")
def bf16_variant(bundle_dir):
    return ort_optimize.optimize_bundle(bundle_dir, "openvino-bf16", [MODEL], progress=lambda _: None)[MODEL]


@pytest.fixture(scope="module")
def int8_ir(bundle_dir, tmp_path_factory):
    """The NNCF int8 IR as the builder writes it, before any gate (see the refusal test)."""
    if importlib.util.find_spec("nncf") is None:
        pytest.skip("nncf (the engines extra) is not installed")
    target = tmp_path_factory.mktemp("openvino-int8") / f"{MODEL}.openvino-int8.xml"
    report = ort_optimize.build_variant(Bundle(bundle_dir), MODEL, "openvino-int8", target)
    return target, report


@pytest.fixture(scope="module")
def int8_bf16_ir(bundle_dir, int8_ir, tmp_path_factory):
    target = tmp_path_factory.mktemp("openvino-int8-bf16") / f"{MODEL}.openvino-int8-bf16.xml"
    report = ort_optimize.build_variant(Bundle(bundle_dir), MODEL, "openvino-int8-bf16", target)
    return target, report


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fp32_ir_is_registered_with_hashed_weights(bundle_dir, fp32_variant):
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    entry = manifest["variants"][MODEL]["openvino-fp32"]
    assert entry["file"] == f"{MODEL}.openvino-fp32.xml" and entry["data_files"] == [f"{MODEL}.openvino-fp32.bin"]
    assert set(entry["data_sha256"]) == set(entry["data_files"])
    assert entry["build"]["inference_precision"] == "f32" and entry["build"]["weights"] == "fp32"
    assert entry["gate"]["passed"] and entry["gate"]["tolerances"]["noise_max_rel"] == EXACT.noise_max_rel
    assert entry["pipeline_gate"]["gate"]["passed"]
    assert entry["pipeline_gate"]["gate"]["enforced_pipelines"] == ["background", "poster"]


def test_fp32_ir_keeps_parity_on_fresh_inputs(bundle_dir, fp32_variant):
    """1e-4 of the output's scale against the exported ONNX, at two sizes of every dynamic axis."""
    bundle = Bundle(bundle_dir)
    contract = bundle.contract(MODEL)
    reference = _ort(bundle.model_path(MODEL))
    session = OpenVinoSession(bundle.model_path(MODEL, variant="openvino-fp32"), threads=2)
    assert session.precision == "f32"
    seed = int.from_bytes(os.urandom(4), "little")
    for index, kind in enumerate(("small", "other")):
        inputs = sample_inputs(contract, default_sizes(kind), seed + index)
        expected = reference.run(None, inputs)[0]
        actual = session.run(None, inputs)[0]
        relative = np.abs(actual - expected).max() / np.abs(expected).max()
        assert relative <= 1e-4, f"seed {seed}, {kind}: {relative:.2e}"


def test_bf16_ir_runs_at_bf16_and_passes_the_enforced_gates(bundle_dir, bf16_variant):
    path = Bundle(bundle_dir).model_path(MODEL, variant="openvino-bf16")
    session = OpenVinoSession(path)
    assert session.precision == "bf16"
    assert "bfloat16" in str(session.compiled.get_property("INFERENCE_PRECISION_HINT"))
    figures = bf16_variant["gate"]["figures"]
    assert bf16_variant["gate"]["passed"] and figures["image_psnr_db"] >= 30.0
    # bf16 really is not fp32: the per-step error sits far above fp32 reassociation (~1e-6)
    assert figures["noise_rel_rms"] > 1e-3
    gate = bf16_variant["pipeline_gate"]["gate"]
    assert gate["passed"] and gate["enforced_pipelines"] == ["background"] and gate["recorded_pipelines"] == ["poster"]
    assert gate["thresholds"]["psnr_db"] == 30.0


def test_backend_serves_the_variant_from_several_threads(bundle_dir, bf16_variant):
    bundle = Bundle(bundle_dir)
    contract = bundle.contract(MODEL)
    requests = [sample_inputs(contract, default_sizes("small"), seed) for seed in range(4)]
    direct = OpenVinoSession(bundle.model_path(MODEL, variant="openvino-bf16"))
    expected = [direct.run(None, inputs)[0] for inputs in requests]
    results = [None] * len(requests)
    with OrtBackend(bundle, intra_op_threads=1, variants={MODEL: "openvino-bf16"}) as backend:
        def call(index):
            results[index] = backend.run(MODEL, requests[index])["noise_pred"]
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert "OpenVinoSession" in type(backend.session(MODEL)).__name__
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_edited_weights_are_refused(bundle_dir, fp32_variant, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(bundle_dir, edited)
    weights = edited / f"{MODEL}.openvino-fp32.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        Bundle(edited).model_path(MODEL, variant="openvino-fp32")


def test_ir_precision_is_read_from_the_file(bundle_dir, tmp_path):
    ov = import_openvino()
    source = Bundle(bundle_dir).model_path("plannet_denoiser")
    write_ir(source, tmp_path / "a.xml", "bf16")
    assert ir_precision(ov.Core().read_model(str(tmp_path / "a.xml"))) == "bf16"
    model = ov.Core().read_model(str(source))
    assert ir_precision(model) == "f32"  # says nothing: fp32, not OpenVINO's bf16 default
    model.set_rt_info("fp8", PRECISION_KEY)
    with pytest.raises(InputError, match="inference_precision"):
        ir_precision(model)
    with pytest.raises(InputError, match="precision"):
        write_ir(source, tmp_path / "b.xml", "int4")


def test_openvino_is_imported_without_its_telemetry(tmp_path):
    """openvino's converter reports usage to Intel by default; posterrt's import turns that off."""
    import subprocess
    import sys

    code = ("import sys; from posterrt.runtime.backends.openvino import import_openvino; import_openvino(); "
            "print('openvino_telemetry' in sys.modules and sys.modules['openvino_telemetry'] is not None)")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # under CI=true openvino would stay quiet anyway: test the developer's case
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not (tmp_path / "intel").exists()  # no telemetry client id was written


def _feeders(operation) -> list[str]:
    """The op types feeding each input of ``operation``, looking through reshapes / transposes."""
    types = []
    for index in range(operation.get_input_size()):
        node = operation.input_value(index).get_node()
        while node.get_type_name() in ("Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        types.append(node.get_type_name())
    return types


def test_int8_ir_is_quantized_with_int8_weights_and_float_probabilities(bundle_dir, int8_ir, tmp_path):
    path, report = int8_ir
    ov = import_openvino()
    model = ov.Core().read_model(str(path))
    assert ir_precision(model) == "f32" and report["inference_precision"] == "f32"
    operations = list(model.get_ops())
    assert report["fake_quantize"] == [op.get_type_name() for op in operations].count("FakeQuantize") > 10
    int8_constants = [op for op in operations if op.get_type_name() == "Constant"
                      and op.get_element_type().get_type_name() == "i8"]
    assert len(int8_constants) == report["int8_weights"] > 10
    matmuls = [op for op in operations if op.get_type_name() == "MatMul"]
    probabilities = [op for op in matmuls if "Softmax" in _feeders(op)]
    scores = [op for op in matmuls if _feeders(op) == ["FakeQuantize", "FakeQuantize"]]
    # every attention: its scores quantized on both inputs, its probabilities x values left float
    assert probabilities and len(scores) == len(probabilities)
    assert all("FakeQuantize" not in _feeders(op) for op in probabilities)
    convolutions = [op for op in operations if op.get_type_name() == "Convolution"]
    assert sum("FakeQuantize" in _feeders(op) for op in convolutions) >= len(convolutions) - 1
    # the weights are stored as int8 on disk: well under half the fp32 IR's weight file
    write_ir(Bundle(bundle_dir).model_path(MODEL), tmp_path / "fp32.xml", "f32")
    assert path.with_suffix(".bin").stat().st_size < 0.5 * (tmp_path / "fp32.bin").stat().st_size
    assert report["calibration_inputs"] > 0 and report["smooth_quant"] is False


def test_int8_ir_passes_the_model_gate_and_really_is_reduced_precision(bundle_dir, int8_ir):
    """The model-level gate (per-step noise error, latent and image after the variant's own loop)
    with the approximate tolerances; the per-step error sits far above fp32's (~1e-6)."""
    path, _ = int8_ir
    gate = quality_gate.run_gate(Bundle(bundle_dir), MODEL, path, APPROXIMATE)
    assert gate["passed"], gate["failures"]
    assert gate["figures"]["noise_rel_rms"] > 1e-2
    assert gate["figures"]["image_psnr_db"] >= APPROXIMATE.image_psnr_db


def test_int8_bf16_is_the_same_quantization_run_at_bf16(bundle_dir, int8_ir, int8_bf16_ir):
    """Same calibration, same NNCF settings: the same weights file byte for byte; only the precision
    the float remainder runs at differs, and OpenVINO compiles it at bf16."""
    (f32_path, f32_report), (path, report) = int8_ir, int8_bf16_ir
    assert path.with_suffix(".bin").read_bytes() == f32_path.with_suffix(".bin").read_bytes()
    assert report["fake_quantize"] == f32_report["fake_quantize"] and report["inference_precision"] == "bf16"
    session = OpenVinoSession(path)
    assert session.precision == "bf16" and "bfloat16" in str(session.compiled.get_property("INFERENCE_PRECISION_HINT"))
    gate = quality_gate.run_gate(Bundle(bundle_dir), MODEL, path, APPROXIMATE)
    assert gate["passed"], gate["failures"]


def test_int8_of_the_tiny_unet_is_refused_by_the_background_pipeline(bundle_dir, int8_ir):
    """As static ``int8`` is: the tiny random-weight bg_unet in NNCF int8 passes the model-level gate
    (above) but a background request of the pipeline gate lands under 30 dB; nothing is written."""
    before = (bundle_dir / MANIFEST).read_text()
    with pytest.raises(ParityError, match=r"bg_unet openvino-int8: accuracy gate failed: background: PSNR [\d.]+ dB < 30 dB"):
        ort_optimize.optimize_bundle(bundle_dir, "openvino-int8", [MODEL], progress=lambda _: None)
    assert (bundle_dir / MANIFEST).read_text() == before
    assert not list(bundle_dir.glob(f"{MODEL}.openvino-int8.*"))
    assert not [p for p in bundle_dir.iterdir() if "staging" in p.name]


def test_nncf_is_imported_without_its_telemetry(tmp_path):
    """NNCF reports to Google Analytics through openvino_telemetry; posterrt's import gives it its stub."""
    import subprocess
    import sys

    if importlib.util.find_spec("nncf") is None:
        pytest.skip("nncf (the engines extra) is not installed")
    code = ("import sys; from posterrt.engines.ort_optimize import import_nncf; import_nncf(); "
            "from nncf.telemetry.wrapper import NNCFTelemetry, telemetry; "
            "print(sys.modules.get('openvino_telemetry') is not None, isinstance(telemetry, NNCFTelemetry))")
    env = {**os.environ, "HOME": str(tmp_path)}
    for name in ("CI", "NNCF_CI", "NNCF_DEV"):  # each would quiet NNCF anyway: test the developer's case
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    assert not (tmp_path / "intel").exists()
