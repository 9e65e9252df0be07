"""`posterrt export` end to end for the RADM models: a bundle with parity, and bad input that
exits 2 with one line and leaves no file behind."""
from __future__ import annotations

import json

import pytest
import torch

from posterrt.export.bundle_writer import Sources
from posterrt.export.networks import radm
from posterrt.export.spec import FP32_RTOL
from posterrt.runtime.bundle import MANIFEST, Bundle, sha256_file
from posterrt.runtime.cli import main
from posterrt.runtime.contracts import CONTRACT_VERSION, get_contract

RADM_MODELS = "radm_backbone,radm_text_encoder,radm_head"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code = main(["export", "--preset", "tiny", "--models", RADM_MODELS, "--out", str(out), "--quiet"])
    return code, out


def test_export_writes_models_manifest_and_parity(exported, capsys):
    code, out = exported
    assert code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["contract_version"] == CONTRACT_VERSION and manifest["preset"] == "tiny"
    assert {"torch", "onnx", "onnxruntime", "transformers", "python"} <= set(manifest["libraries"])
    for name in RADM_MODELS.split(","):
        entry = manifest["models"][name]
        assert (out / f"{name}.onnx").is_file()
        assert entry["sha256"] == sha256_file(out / entry["file"])
        parity = entry["parity"]
        assert parity["passed"] and parity["max_rel"] <= FP32_RTOL == parity["tolerance_rel"]
        # two runs, and every dynamic input axis of the model at a different size in each
        small, other = (run["sizes"] for run in parity["runs"])
        assert set(small) == set(get_contract(name).input_dims())
        assert all(small[d] != other[d] for d in small), (name, small, other)
        for run in parity["runs"]:
            assert all(o["max_rel"] <= FP32_RTOL for o in run["outputs"].values())
    assert (out / manifest["assets"]["radm_tokenizer"]).is_file()
    # the runtime reads it back: hashes verify and contracts resolve
    bundle = Bundle(out)
    for name in RADM_MODELS.split(","):
        bundle.model_path(name)
        bundle.contract(name)
    assert bundle.config["radm"]["class_names"] == ["logo", "text", "underlay", "embellishment"]


def test_export_writes_the_tensorrt_operator_report(exported, capsys):
    from posterrt.engines.onnx_operators import REPORT_FILE
    from posterrt.export.cli import _print_tensorrt_ops

    _, out = exported
    report = json.loads((out / REPORT_FILE).read_text())
    assert sorted(report["models"]) == sorted(RADM_MODELS.split(","))
    _print_tensorrt_ops(out)
    assert capsys.readouterr().out.splitlines() == [
        "TensorRT 10.15 ONNX parser table: 3 of 3 models clean; radm_head's RoiAlign rewritten plugin-free by prepare_onnx",
        f"TensorRT operator report: {out / REPORT_FILE}"]


def test_no_staging_folder_is_left_beside_the_bundle(exported):
    _, out = exported
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def _checkpoint_state():
    state = {}
    for model in ("radm_backbone", "radm_head"):
        state.update(radm.build(model, "tiny", Sources()).module.state_dict())
    return state


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing.pth"
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip archive")
    wrong = tmp_path / "wrong_shape.safetensors"
    state = _checkpoint_state()
    state["backbone.fpn_lateral3.weight"] = torch.zeros(16, 5, 1, 1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(wrong))
    return {
        "unknown preset": (["--preset", "huge", "--models", "radm_head"], "huge"),
        "unknown model": (["--models", "radm_head,radm_tail"], "radm_tail"),
        "missing checkpoint": (["--models", RADM_MODELS, "--checkpoint", f"radm={missing}"], str(missing)),
        "corrupt checkpoint": (["--models", RADM_MODELS, "--checkpoint", f"radm={corrupt}"], str(corrupt)),
        "shape mismatch": (["--models", RADM_MODELS, "--checkpoint", f"radm={wrong}"], "backbone.fpn_lateral3.weight"),
    }


@pytest.mark.parametrize("case", ["unknown preset", "unknown model", "missing checkpoint", "corrupt checkpoint",
                                  "shape mismatch"])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, existing):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, named = _bad_inputs(inputs)[case]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "bundle"
    if existing:  # a folder the user already had: it must come out untouched
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    capsys.readouterr()
    code = main(["export", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and named in err, err
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before
    if existing:
        assert (out / "notes.txt").read_text() == "mine"
