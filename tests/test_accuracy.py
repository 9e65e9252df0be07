"""The accuracy report and its gate: SSIM / PSNR and box matching on hand-computed cases, the gate's
messages, the report `posterrt export` writes for the tiny bundle (ONNX Runtime against PyTorch:
passes, and the same numbers when run again), deliberately broken candidates (fail, saying which
check by how much), optimized variants through `gate_variant`, and partial exports."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from posterrt.runtime import accuracy
from posterrt.runtime.accuracy import (ACCURACY_PIPELINES, FP32_GATE, REDUCED_PRECISION_GATE, REPORT_FILE,
                                       GateThresholds, accuracy_report, carry_over, check_gate, compare_layouts,
                                       fixed_cases, gate_variant, pipeline_models, synthetic_product)
from posterrt.runtime.backends.base import Backend
from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import MANIFEST, Bundle, sha256_file
from posterrt.runtime.errors import InputError
from posterrt.runtime.pipelines import build_pipeline
from posterrt.runtime.pipelines.request import LayoutElement
from posterrt.runtime.ssim import gaussian_window, luminance, psnr, ssim, ssim_map


# ---------------------------------------------------------------------------------------------
# SSIM and PSNR
# ---------------------------------------------------------------------------------------------
def brute_force_ssim(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5, peak=255.0) -> float:
    """Wang et al.'s formula window by window with an explicit 2-D Gaussian (no separable filter)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    values = []
    for top in range(x.shape[0] - size + 1):
        for left in range(x.shape[1] - size + 1):
            a, b = x[top:top + size, left:left + size], y[top:top + size, left:left + size]
            mu_a, mu_b = (kernel * a).sum(), (kernel * b).sum()
            var_a, var_b = (kernel * (a - mu_a) ** 2).sum(), (kernel * (b - mu_b) ** 2).sum()
            cov = (kernel * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_a_constant_shift_is_the_luminance_term():
    # flat images: no variance, so contrast-structure is (0 + C2) / (0 + C2) = 1 and only the
    # luminance term (2 a b + C1) / (a^2 + b^2 + C1) remains, the same at every window
    a, b = 100.0, 130.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(np.full((20, 20), a), np.full((20, 20), b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(26006.5025 / 26906.5025, abs=1e-12)  # C1 = 2.55^2 = 6.5025


def test_ssim_matches_the_window_by_window_formula():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (16, 18))
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    assert ssim_map(x, y).shape == (6, 8)
    assert ssim(x, y) == pytest.approx(brute_force_ssim(x, y), rel=1e-10)


def test_ssim_orders_noise_levels_and_sees_inverted_structure():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (32, 32))
    noisy = [np.clip(x + rng.normal(0, s, x.shape), 0, 255) for s in (5, 20, 60)]
    values = [ssim(x, y) for y in noisy]
    assert values[0] > values[1] > values[2]
    assert ssim(x, noisy[1]) == pytest.approx(ssim(noisy[1], x), rel=1e-12)  # symmetric
    assert ssim(x, 255 - x) < 0  # every local correlation is -1


def test_ssim_reads_luminance_of_rgb():
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[..., 1] = 200
    assert luminance(rgb)[0, 0] == pytest.approx(0.587 * 200)
    assert gaussian_window().sum() == pytest.approx(1.0) and len(gaussian_window()) == 11


def test_ssim_and_psnr_refuse_mismatched_or_tiny_images():
    with pytest.raises(InputError, match="shapes differ"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))
    with pytest.raises(InputError, match="smaller than the 11x11"):
        ssim(np.zeros((8, 30)), np.zeros((8, 30)))
    with pytest.raises(InputError, match="shapes differ"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


def test_psnr_hand_cases():
    image = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(image, image) == math.inf
    # one grey level off everywhere: MSE 1, PSNR = 20 log10(255)
    assert psnr(image, image + 1) == pytest.approx(20 * math.log10(255), rel=1e-12)
    off = image.astype(np.int16).copy()
    off[0, 0, 0] += 64  # one value off by 64 among 192: MSE 64^2 / 192
    assert psnr(image, off) == pytest.approx(10 * math.log10(255 ** 2 / (64 ** 2 / 192)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Box matching
# ---------------------------------------------------------------------------------------------
def element(cls, box, text=None):
    return LayoutElement(cls, tuple(float(v) for v in box), 0.9, text)


def test_identical_layouts_agree_exactly():
    layout = [element("text", (10, 10, 50, 30), "a"), element("logo", (60, 5, 90, 25))]
    result = compare_layouts(layout, copy.deepcopy(layout), (100, 100))
    assert result == {"reference_elements": 2, "candidate_elements": 2, "matched": 2, "unmatched": 0,
                      "text_mismatches": 0, "max_box_error": 0.0, "mean_iou": 1.0}


def test_box_error_is_the_worst_corner_over_the_canvas_side():
    reference = [element("text", (10, 10, 50, 30)), element("text", (10, 60, 50, 80))]
    candidate = [element("text", (10, 61, 50, 81)), element("text", (12, 10, 50, 30))]  # swapped order
    result = compare_layouts(reference, candidate, (200, 100))
    assert result["matched"] == 2 and result["unmatched"] == 0
    # the y shift of 1 px is 1/100 of the height; the x shift of 2 px is 2/200 of the width
    assert result["max_box_error"] == pytest.approx(0.01)


def test_matching_takes_the_best_overlap_first():
    reference = [element("text", (0, 0, 40, 40)), element("text", (30, 0, 70, 40))]
    # the first candidate overlaps both references, best the second one; greedy-by-IoU must not give
    # it to the first reference (which would leave the second candidate unmatched)
    candidate = [element("text", (29, 0, 69, 40)), element("text", (0, 0, 40, 41))]
    result = compare_layouts(reference, candidate, (100, 100))
    assert result["matched"] == 2 and result["max_box_error"] == pytest.approx(0.01)


def test_other_class_extra_element_weak_overlap_and_texts_count_as_disagreement():
    reference = [element("text", (0, 0, 40, 20), "Sale"), element("logo", (50, 50, 80, 80))]
    candidate = [element("text", (0, 0, 40, 20), "Free"), element("underlay", (50, 50, 80, 80)),
                 element("logo", (85, 85, 99, 99))]
    result = compare_layouts(reference, candidate, (100, 100))
    # text matched (other line); the logo's partner has another class; the candidate logo is disjoint
    assert (result["matched"], result["unmatched"], result["text_mismatches"]) == (1, 3, 1)
    assert result["max_box_error"] == 0.0


# ---------------------------------------------------------------------------------------------
# The gate on hand-made reports
# ---------------------------------------------------------------------------------------------
def hand_report(**layout):
    base = {"reference_elements": 10, "candidate_elements": 10, "matched": 10, "unmatched": 0, "text_mismatches": 0,
            "max_box_error": 1e-6, "mean_iou": 1.0}
    base.update(layout)
    metrics = {"radm.R_com": {"reference": 100.0, "candidate": 100.5, "delta": 0.5},
               "radm.R_ove": {"reference": 0.1, "candidate": 0.1, "delta": 0.0}}
    return {"models": {"radm_head": {"max_rel": 2e-6, "tolerance_rel": 1e-4, "passed": True, "seed": 1}},
            "pipelines": {"poster": {"layout": base, "layout_metrics": metrics,
                                     "cases": [{"case": "a", "image": {"psnr_db": 45.0, "ssim": 0.999}},
                                               {"case": "b", "image": {"psnr_db": None, "ssim": 1.0}}]}}}


def test_gate_passes_a_close_report():
    assert check_gate(hand_report(), FP32_GATE) == []


def test_gate_messages_name_the_check_and_the_amount():
    report = hand_report(max_box_error=2.5e-3, unmatched=3, candidate_elements=11, matched=9, text_mismatches=1)
    report["pipelines"]["poster"]["layout_metrics"]["radm.R_com"]["candidate"] = 104.0
    report["pipelines"]["poster"]["layout_metrics"]["radm.R_ove"]["candidate"] = None
    report["pipelines"]["poster"]["cases"][0]["image"] = {"psnr_db": 31.24, "ssim": 0.95}
    report["models"]["radm_head"].update(max_rel=3e-3, passed=False)
    failures = check_gate(report, FP32_GATE)
    assert failures == [
        "model radm_head: tensor max relative error 3.00e-03 > 1e-04",
        "poster: box corner error 2.50e-03 of the canvas > 1e-03",
        "poster: 3 of 21 elements unmatched (14.3% > 0%; reference 10, candidate 11 elements)",
        "poster: 1 of 9 matched elements carry another text line (> 0%)",
        "poster: layout metric radm.R_com 104 vs reference 100 (|delta| 4 > 1)",
        "poster: layout metric radm.R_ove is defined for the reference only",
        "poster: PSNR 31.2 dB < 40 dB (request a)",
        "poster: SSIM 0.9500 < 0.99 (request a)",
    ]
    # the reduced-precision bounds accept the box and image figures, not the unmatched share
    relaxed = check_gate(report, REDUCED_PRECISION_GATE)
    assert not any("box corner" in f or "PSNR" in f or "SSIM" in f for f in relaxed)
    assert any("elements unmatched" in f for f in relaxed)


def test_gate_thresholds_are_ordered():
    for field in ("box_error", "unmatched_fraction", "metric_abs_delta", "metric_rel_delta"):
        assert getattr(FP32_GATE, field) <= getattr(REDUCED_PRECISION_GATE, field)
    assert FP32_GATE.psnr_db > REDUCED_PRECISION_GATE.psnr_db and FP32_GATE.ssim > REDUCED_PRECISION_GATE.ssim


def test_carry_over_keeps_unchanged_pipelines_and_drops_stale_ones():
    previous = {"format": accuracy.REPORT_FORMAT, "settings": {"cases": 2}, "pipelines": {
        "layout": {"models": {"radm_head": "aaa"}, "image": {}}, "background": {"models": {"bg_unet": "bbb"}}},
        "skipped": {}, "gate": {"passed": True}}
    fresh = {"pipelines": {"render": {"models": {"render_unet": "ccc"}}}, "skipped": {"layout": "x", "background": "y"}}
    merged = carry_over(fresh, previous, {"radm_head": "aaa", "bg_unet": "new", "render_unet": "ccc"})
    assert set(merged["pipelines"]) == {"render", "layout"} and merged["pipelines"]["layout"]["carried_over"]
    assert merged["skipped"] == {"background": "y"}
    nothing_new = carry_over(None, previous, {"radm_head": "changed", "bg_unet": "bbb"})
    assert set(nothing_new["pipelines"]) == {"background"} and "layout" in nothing_new["skipped"]
    assert "gate" not in nothing_new and carry_over(None, None, {}) is None


# ---------------------------------------------------------------------------------------------
# The fixed request set
# ---------------------------------------------------------------------------------------------
def test_fixed_cases_are_fixed_and_valid():
    first, again = fixed_cases(3), fixed_cases(3)
    assert [c.name for c in first] == ["product.png", "synthetic-1", "synthetic-2"]
    for one, two in zip(first, again):
        assert np.array_equal(one.request.product, two.request.product)
        assert np.array_equal(one.request.product_mask, two.request.product_mask)
        assert one.request.texts == two.request.texts and one.request.seed == two.request.seed
    assert len({c.request.seed for c in first}) == 3
    rgb, mask = synthetic_product(5)
    assert rgb.dtype == np.uint8 and rgb.shape[:2] == mask.shape
    assert 0.05 < float((mask > 0.5).mean()) < 0.95  # a cutout with free background around it
    with pytest.raises(InputError, match="cases: got 0"):
        fixed_cases(0)
    with pytest.raises(InputError, match="pipelines: got 'posters'"):
        pipeline_models("posters")


# ---------------------------------------------------------------------------------------------
# On the tiny bundle
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle(tiny_bundle)


@pytest.fixture(scope="module")
def ort(bundle):
    return OrtBackend(bundle, intra_op_threads=2)


class RecordingBackend(Backend):
    """Delegates to another backend; records the models called and can perturb one model's outputs."""

    def __init__(self, inner: Backend, perturb=None):
        super().__init__(inner.bundle)
        self.inner, self.perturb, self.calls = inner, perturb or {}, Counter()

    def _run(self, contract, inputs):
        self.calls[contract.name] += 1
        outputs = self.inner._run(contract, inputs)
        if contract.name in self.perturb:
            outputs = self.perturb[contract.name](outputs)
        return outputs


@pytest.mark.parametrize("name", ACCURACY_PIPELINES)
def test_pipeline_models_are_the_models_each_pipeline_calls(ort, name):
    backend = RecordingBackend(ort)
    pipeline = build_pipeline(name, backend, progress=False)
    for case in fixed_cases(2, steps=1, layout_steps=1):  # the second has a style image
        pipeline(case.request)
    assert set(backend.calls) == set(pipeline_models(name))


def test_export_writes_a_passing_report_for_every_pipeline(tiny_bundle):
    report = json.loads((tiny_bundle / REPORT_FILE).read_text())
    assert report["candidate"] == "onnxruntime" and report["reference"] == "pytorch"
    assert report["gate"] == {"thresholds": dataclasses.asdict(FP32_GATE), "failures": [], "passed": True}
    assert list(report["pipelines"]) == list(ACCURACY_PIPELINES) and report["skipped"] == {}
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert set(report["models"]) == set(manifest["models"])
    for name, entry in report["pipelines"].items():
        assert entry["models"] == {m: manifest["models"][m]["sha256"] for m in pipeline_models(name)}
        assert len(entry["cases"]) == report["settings"]["cases"] == 2
        if name == "background":
            assert entry["layout"] is None
            continue
        # not vacuous: the tiny weights place elements, and the layout metrics are defined
        assert entry["layout"]["reference_elements"] > 0 and entry["layout"]["unmatched"] == 0
        assert entry["layout_metrics"]["radm.R_ali"]["reference"] is not None


def test_report_is_deterministic(bundle, tiny_bundle):
    """The export's figures again, computed fresh with its settings (two runs, same numbers). Two
    pipelines keep the test short: RADM, and the background generator's five models."""
    from posterrt.export.bundle_writer import ACCURACY_CASES
    from posterrt.export.torch_backend import TorchBackend

    written = json.loads((tiny_bundle / REPORT_FILE).read_text())
    pipelines = ["layout", "background"]
    with OrtBackend(bundle) as candidate, TorchBackend(bundle) as reference:
        again = accuracy_report(bundle, candidate, reference, pipelines, cases=ACCURACY_CASES,
                                candidate_name="onnxruntime", reference_name="pytorch")
    again = json.loads(json.dumps(again))  # the file's JSON types (tuples -> lists)
    assert again["pipelines"] == {name: written["pipelines"][name] for name in pipelines}
    assert again["settings"] == written["settings"] and again["cases"] == written["cases"]


def box_shift(outputs, pixels=3.0):
    return {**outputs, "pred_boxes": outputs["pred_boxes"] + np.float32(pixels)}


def test_a_broken_layout_model_fails_with_the_box_error(bundle, ort):
    report = accuracy_report(bundle, RecordingBackend(ort, {"radm_head": box_shift}), ort, pipelines=["layout"], cases=1)
    failures = check_gate(report, FP32_GATE)
    assert failures, report["pipelines"]["layout"]["layout"]
    assert re.fullmatch(r"layout: box corner error \d\.\d\de-0[1-3] of the canvas > 1e-03", failures[0]), failures
    # the same report, judged against thresholds that accept anything, passes: the gate reads only it
    anything = GateThresholds(box_error=1.0, unmatched_fraction=1.0, metric_abs_delta=1e9, metric_rel_delta=1e9,
                              psnr_db=0.0, ssim=-1.0)
    assert check_gate(report, anything) == []


def test_a_broken_unet_fails_with_the_psnr(bundle, ort):
    def biased(outputs):
        return {"noise_pred": outputs["noise_pred"] + np.float32(0.3)}

    report = accuracy_report(bundle, RecordingBackend(ort, {"bg_unet": biased}), ort, pipelines=["background"], cases=1)
    failures = check_gate(report, FP32_GATE)
    assert any(re.fullmatch(r"background: PSNR \d+\.\d dB < 40 dB \(request product\.png\)", f) for f in failures), failures
    assert report["pipelines"]["background"]["image"]["min_psnr_db"] < 40


def perturbed_copy(source, target, scale):
    """The ONNX file with its largest weight scaled: 0 stands in for a badly broken variant."""
    model = onnx.load(str(source))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) * np.float32(scale), largest.name))
    onnx.save(model, str(target))
    return target


def test_gate_variant_passes_an_exact_variant_and_fails_a_perturbed_one(bundle, tmp_path):
    exact = tmp_path / "bg_unet.same.onnx"
    shutil.copy(bundle.model_path("bg_unet"), exact)
    report = gate_variant(bundle, "same", FP32_GATE, files={"bg_unet": exact}, pipelines=["background"], cases=1)
    assert report["gate"]["passed"], report["gate"]
    assert report["candidate"] == "onnxruntime same" and report["variant"] == {"name": "same", "models": ["bg_unet"]}

    broken = perturbed_copy(bundle.model_path("bg_unet"), tmp_path / "bg_unet.broken.onnx", 0.0)
    report = gate_variant(bundle, "broken", REDUCED_PRECISION_GATE, files={"bg_unet": broken},
                          pipelines=["background"], cases=1)
    assert not report["gate"]["passed"]
    assert any(re.fullmatch(r"background: PSNR \d+\.\d dB < 30 dB \(request product\.png\)", f)
               for f in report["gate"]["failures"]), report["gate"]["failures"]
    with pytest.raises(accuracy.ParityError, match="bg_unet broken: accuracy gate failed: background: "):
        accuracy.require_passed(report, "bg_unet broken")


def test_gate_variant_reads_registered_variants(tiny_bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    variant = perturbed_copy(folder / "bg_unet.onnx", folder / "bg_unet.test.onnx", 1.0)  # same weights
    manifest["variants"] = {"bg_unet": {"test": {"file": variant.name, "sha256": sha256_file(variant),
                                                 "source_sha256": manifest["models"]["bg_unet"]["sha256"]}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    report = gate_variant(folder, "test", FP32_GATE, cases=1)
    # the pipelines that call bg_unet, nothing else
    assert set(report["pipelines"]) == {"background", "poster"} and report["gate"]["passed"], report["gate"]
    with pytest.raises(InputError, match="no model of bundle .* has variant 'int8'"):
        gate_variant(folder, "int8")


# ---------------------------------------------------------------------------------------------
# `posterrt export`: partial exports, a failing gate leaves nothing, --no-accuracy
# ---------------------------------------------------------------------------------------------
RADM = "radm_backbone,radm_text_encoder,radm_head"


def test_partial_exports_and_a_failing_gate(tmp_path, capsys, monkeypatch):
    from posterrt.runtime.cli import main

    out = tmp_path / "bundle"
    assert main(["export", "--models", RADM, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"layout +boxes \d+/\d+ matched, max error", printed) and "gate passed" in printed
    assert "poster     not evaluated: models ['clip_text_encoder'" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert list(report["pipelines"]) == ["layout"] and set(report["skipped"]) == {"background", "render", "poster"}

    # a gate nothing can pass: exit 2, one line naming the check, the bundle untouched
    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    monkeypatch.setattr(accuracy, "FP32_GATE", dataclasses.replace(FP32_GATE, box_error=-1.0))
    assert main(["export", "--models", RADM, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accuracy gate" in err, err
    assert files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left
    monkeypatch.undo()

    # figures measured on other radm_head weights (as if an earlier export had other weights),
    # then radm_head exported without the report: the layout entry is stale and dropped
    report["pipelines"]["layout"]["models"]["radm_head"] = "0" * 64
    (out / REPORT_FILE).write_text(json.dumps(report))
    assert main(["export", "--models", "radm_head", "--out", str(out), "--quiet", "--no-accuracy"]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["pipelines"] == {} and "exported again without an accuracy report" in report["skipped"]["layout"]
    assert "accuracy" not in capsys.readouterr().out
