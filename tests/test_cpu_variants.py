"""The CPU kind read from its flags, and the variant posterrt runs by default for each model
(runtime/cpu_variants.py), through every entry point: generate, repo build, open_backend, and
`posterrt engines variants`; the benches stay on what they name."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posterrt.engines import ort_optimize
from posterrt.runtime import cpu_variants
from posterrt.runtime.bundle import BUNDLE_FORMAT, MANIFEST, Bundle
from posterrt.runtime.cli import main
from posterrt.runtime.contracts import CONTRACT_VERSION
from posterrt.runtime.cpu_variants import NO_VARIANTS, choose_variants, cpu_flags, default_variants, detect_cpu

from helpers_bundle import linked_bundle_copy

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"

# /proc/cpuinfo flag lines, cut to what matters plus some of what surrounds it
XEON_AMX = ("fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 "
            "avx_vnni avx512_fp16")
EPYC = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 vaes"
AVX2 = "fpu sse2 avx avx2 fma"
VNNI_ONLY = "fpu avx2 avx512f avx512_vnni"  # a Cascade Lake: int8 VNNI, no bf16: nothing measured


@pytest.mark.parametrize("flags, kind", [(XEON_AMX, "amx"), (EPYC, "avx512-bf16-vnni"), (AVX2, "generic"),
                                         (VNNI_ONLY, "generic"), ("", "generic")])
def test_the_kind_from_the_flags(flags, kind):
    assert detect_cpu(flags.split()).name == kind


def test_flags_are_read_from_cpuinfo_and_missing_cpuinfo_is_generic(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {EPYC}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {EPYC}\n")
    assert cpu_flags(cpuinfo) == frozenset(EPYC.split())
    assert cpu_variants.cpuinfo_value("model name", cpuinfo) == "AMD EPYC 9R14"
    assert cpu_flags(tmp_path / "absent") == frozenset()  # another OS: no /proc/cpuinfo
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # aarch64 names no x86 flags
    assert detect_cpu(cpu_flags(arm)).name == "generic"


def test_every_kind_ranks_only_known_variants_and_cites_sections_that_exist():
    headings = {line.lstrip("#").strip() for line in RESULTS.read_text().splitlines() if line.startswith("#")}
    for kind in cpu_variants.CPU_KINDS:
        assert set(kind.order) <= set(ort_optimize.VARIANTS), kind.name
        assert len(set(kind.order)) == len(kind.order), kind.name
        assert set(kind.results_sections) <= headings, f"{kind.name} cites a RESULTS.md section that is not there"
    assert cpu_variants.CPU_KINDS[-1].needs == frozenset(), "the last kind takes every CPU"
    generic = cpu_variants.cpu_kind("generic")
    assert all(ort_optimize.VARIANT_GATES[v] == ort_optimize.quality_gate.EXACT for v in generic.order)


# --- the pick, on a manifest written here ---------------------------------------------------------
GATED = {"gate": {"passed": True}, "pipeline_gate": {"gate": {"passed": True}}}


@pytest.fixture
def manifest_bundle(tmp_path):
    """A bundle folder with bg_unet and render_unet entries and these variants of them: what is
    read is the manifest and whether the files are there (``write(model, variant, **entry)``)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    manifest = {"format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION, "preset": "tiny", "config": {},
                "models": {m: {"file": f"{m}.onnx", "sha256": f"{m}-sha", "static_dims": {}}
                           for m in ("bg_unet", "render_unet")}, "variants": {}}

    def write(model: str, variant: str, **entry):
        name = ort_optimize.variant_file(model, variant)
        (folder / name).write_bytes(b"variant")
        record = {"file": name, "sha256": "x", "source_sha256": f"{model}-sha", **GATED, **entry}
        manifest["variants"].setdefault(model, {})[variant] = record
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return Bundle(folder)

    (folder / MANIFEST).write_text(json.dumps(manifest))
    return write


def _kind(flags: str):
    return detect_cpu(flags.split())


def test_the_fastest_gated_variant_of_the_kind_is_picked(manifest_bundle):
    for variant in ("fp32-opt", "int8-dynamic", "openvino-fp32", "openvino-bf16", "int8"):
        bundle = manifest_bundle("bg_unet", variant)
    bundle = manifest_bundle("render_unet", "int8-dynamic")
    assert default_variants(bundle, _kind(EPYC)) == {"bg_unet": "int8", "render_unet": "int8-dynamic"}
    assert default_variants(bundle, _kind(XEON_AMX)) == {"bg_unet": "openvino-bf16", "render_unet": "int8-dynamic"}
    # no measured CPU: the exact variants only, approximate ones never by default
    assert default_variants(bundle, _kind(AVX2)) == {"bg_unet": "openvino-fp32"}
    assert default_variants(bundle, _kind(EPYC), models=["render_unet"]) == {"render_unet": "int8-dynamic"}


def test_a_failed_gate_a_stale_or_missing_file_is_never_picked(manifest_bundle):
    manifest_bundle("bg_unet", "fp32-opt")
    manifest_bundle("bg_unet", "int8", gate={"passed": False})
    bundle = manifest_bundle("bg_unet", "openvino-bf16", pipeline_gate={"gate": {"passed": False}})
    assert default_variants(bundle, _kind(EPYC)) == {"bg_unet": "fp32-opt"}
    assert "quality gate did not pass" in cpu_variants.why_not(bundle, "bg_unet", "int8")
    assert "pipeline gate did not pass" in cpu_variants.why_not(bundle, "bg_unet", "openvino-bf16")
    # a skipped pipeline gate (the bundle lacks the pipelines' other models) is not a failure
    bundle = manifest_bundle("bg_unet", "openvino-bf16", pipeline_gate={"skipped": "no vae_decoder"})
    assert default_variants(bundle, _kind(EPYC)) == {"bg_unet": "openvino-bf16"}
    # no gate report at all, a variant of an older export, a deleted file
    bundle = manifest_bundle("bg_unet", "int8", gate={}, pipeline_gate={})
    assert cpu_variants.why_not(bundle, "bg_unet", "int8") == "its quality gate did not pass"
    bundle = manifest_bundle("bg_unet", "openvino-bf16", source_sha256="old-export")
    assert "another export" in cpu_variants.why_not(bundle, "bg_unet", "openvino-bf16")
    assert default_variants(bundle, _kind(EPYC)) == {"bg_unet": "fp32-opt"}
    (bundle.root / "bg_unet.fp32-opt.onnx").unlink()
    assert default_variants(bundle, _kind(EPYC)) == {}


def test_without_openvino_the_openvino_variants_are_skipped(manifest_bundle, monkeypatch):
    manifest_bundle("bg_unet", "int8")
    bundle = manifest_bundle("bg_unet", "openvino-bf16")
    assert default_variants(bundle, _kind(XEON_AMX)) == {"bg_unet": "openvino-bf16"}
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an install without it looks like to import
    assert cpu_variants.why_not(bundle, "bg_unet", "openvino-bf16") == "OpenVINO is not installed"
    assert default_variants(bundle, _kind(XEON_AMX)) == {"bg_unet": "int8"}


def test_a_model_an_onnx_only_stage_drives_gets_no_ir(manifest_bundle):
    manifest_bundle("bg_unet", "int8-dynamic")
    bundle = manifest_bundle("bg_unet", "openvino-bf16")
    assert default_variants(bundle, _kind(XEON_AMX), onnx_only=["bg_unet"]) == {"bg_unet": "int8-dynamic"}


def test_the_choice_and_its_line(manifest_bundle):
    bundle = manifest_bundle("bg_unet", "int8")
    default = choose_variants(bundle, None, flags=EPYC.split())
    assert default.variants == {"bg_unet": "int8"} and default.how == "default"
    assert default.line() == ("variants: bg_unet=int8 (the default: this CPU is kind avx512-bf16-vnni: avx512_bf16, "
                              "avx512_vnni; --variants none for the exported fp32 files); other models run their "
                              "exported fp32 files")
    assert default.record() == {"variants": {"bg_unet": "int8"}, "chosen": "default", "cpu_kind": "avx512-bf16-vnni"}
    nothing = choose_variants(bundle, None, flags=AVX2.split())
    assert nothing.variants == {} and nothing.line() == (
        "variants: none (this CPU is kind generic: no AMX, no AVX-512 bf16 + VNNI; the bundle has no gated variant "
        "that kind runs by default): the exported fp32 files")
    for text in (NO_VARIANTS, " None "):
        forced = choose_variants(bundle, text, flags=EPYC.split())
        assert forced.variants == {} and forced.line() == "variants: none (--variants none): the exported fp32 files"
    given = choose_variants(bundle, "render_unet=fp32-opt", flags=EPYC.split())  # exactly the list: no default added
    assert given.variants == {"render_unet": "fp32-opt"}
    assert given.line() == "variants: render_unet=fp32-opt (as given by --variants); other models run their exported fp32 files"
    api = choose_variants(bundle, None, flags=EPYC.split()).line(flag="variants")
    assert "variants={} for the exported fp32 files" in api


# --- the entry points, on a copy of the tiny bundle with a real gated variant ---------------------
@pytest.fixture(scope="module")
def variant_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle (a linked copy) with bg_unet's int8-dynamic, and its cached steps', built and
    gated by `engines optimize` (it passes both gates on tiny)."""
    folder = linked_bundle_copy(tiny_bundle, tmp_path_factory.mktemp("cpu-default") / "tiny")
    ort_optimize.optimize_bundle(folder, "int8-dynamic", ["bg_unet"], progress=lambda _: None)
    return folder


@pytest.fixture
def epyc(monkeypatch):
    """This process sees the EPYC's flags (the default must not depend on the machine CI runs on)."""
    monkeypatch.setattr(cpu_variants, "cpu_flags", lambda path=None: frozenset(EPYC.split()))


@pytest.fixture(scope="module")
def product(tmp_path_factory) -> Path:
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[20:80, 70:110, 3] = 255
    path = tmp_path_factory.mktemp("product") / "product.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _generate(bundle: Path, product: Path, out: Path, *extra) -> bytes:
    assert main(["generate", "--product", str(product), "--pipeline", "background", "--bundle", str(bundle),
                 "--size", "256x256", "--steps", "2", "--quiet", "--out", str(out), *extra]) == 0
    return out.read_bytes()


def test_generate_runs_the_default_variant_and_none_forces_fp32(variant_bundle, tiny_bundle, product, tmp_path,
                                                                 capsys, epyc):
    default = _generate(variant_bundle, product, tmp_path / "default.png")
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("variants: bg_unet=int8-dynamic (the default: this CPU is kind avx512-bf16-vnni")
    named = _generate(variant_bundle, product, tmp_path / "named.png", "--variants", "bg_unet=int8-dynamic")
    assert "(as given by --variants)" in capsys.readouterr().out
    forced = _generate(variant_bundle, product, tmp_path / "none.png", "--variants", "none")
    assert capsys.readouterr().out.splitlines()[0] == "variants: none (--variants none): the exported fp32 files"
    plain = _generate(tiny_bundle, product, tmp_path / "plain.png")
    assert "the bundle has no gated variant" in capsys.readouterr().out
    assert default == named, "the default ran the variant"
    assert forced == plain, "`none` ran the exported files, as a bundle without variants does"
    assert default != forced, "int8-dynamic gives other pixels than fp32 (else this test shows nothing)"


def test_repo_build_serves_the_default_and_none_the_export(variant_bundle, tmp_path, capsys, epyc):
    from posterrt.runtime.triton import repository

    def served(out: Path) -> str | None:
        config = (out / "bg_unet" / "config.pbtxt").read_text()
        return "int8-dynamic" if repository.VARIANT_PARAMETER in config and "int8-dynamic" in config else None

    argv = ["repo", "build", "--bundle", str(variant_bundle), "--models", "bg_unet", "--out"]
    assert main([*argv, str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert "variants: bg_unet=int8-dynamic (the default: this CPU is kind avx512-bf16-vnni" in printed
    assert "(variant int8-dynamic, sha256 " in printed and served(tmp_path / "default") == "int8-dynamic"
    assert main([*argv, str(tmp_path / "none"), "--variants", "none"]) == 0
    assert "variants: none (--variants none)" in capsys.readouterr().out and served(tmp_path / "none") is None
    # the GPU flavors serve no variants: no default is picked for them, and nothing is said
    assert main([*argv, str(tmp_path / "gpu"), "--flavor", "gpu-onnx"]) == 0
    assert "variants:" not in capsys.readouterr().out and served(tmp_path / "gpu") is None


def test_open_backend_defaults_and_the_benches_stay_explicit(variant_bundle, caplog, epyc):
    from posterrt.benchmarks.serving import embedded_backend
    from posterrt.runtime.backends import open_backend

    bundle = Bundle(variant_bundle)
    with caplog.at_level(logging.INFO, logger="posterrt"):
        backend = open_backend(bundle)
    assert backend.variants == {"bg_unet": "int8-dynamic"}
    assert [r.message for r in caplog.records if r.message.startswith("variants:")] == [
        "variants: bg_unet=int8-dynamic (the default: this CPU is kind avx512-bf16-vnni: avx512_bf16, avx512_vnni; "
        "variants={} for the exported fp32 files); other models run their exported fp32 files"]
    assert open_backend(bundle, variants={}).variants == {}
    assert embedded_backend(bundle, threads=1).variants == {}


def test_engines_variants_shows_the_kind_and_the_pick(variant_bundle, tiny_bundle, capsys, epyc):
    assert main(["engines", "variants", "--bundle", str(variant_bundle)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("this CPU: kind avx512-bf16-vnni (flags posterrt reads: avx512_bf16, avx512_vnni)")
    order = " > ".join(cpu_variants.cpu_kind("avx512-bf16-vnni").order)
    assert order.startswith("openvino-int8-bf16 > ") and f"order of kind avx512-bf16-vnni: {order}" in out
    assert "bg_unet            default int8-dynamic" in out and "registered: int8-dynamic (gated)" in out
    assert main(["engines", "variants", "--bundle", str(variant_bundle), "--cpu", "generic"]) == 0
    out = capsys.readouterr().out
    assert "default none (exported fp32)" in out and "never a default on kind generic" in out
    assert main(["engines", "variants", "--bundle", str(tiny_bundle)]) == 0
    assert "has no CPU variants" in capsys.readouterr().out


def test_a_unet_variant_is_the_default_only_with_its_cached_steps(variant_bundle, tmp_path, epyc):
    """The cached steps run their UNet's pick and are never picked themselves; a UNet variant whose
    cached steps lack it is no default (a cached request would fail)."""
    bundle = Bundle(variant_bundle)
    assert default_variants(bundle) == {"bg_unet": "int8-dynamic"}
    partial = linked_bundle_copy(variant_bundle, tmp_path / "partial")
    manifest = json.loads((partial / MANIFEST).read_text())
    del manifest["variants"]["bg_unet_shallow"]["int8-dynamic"]
    (partial / MANIFEST).write_text(json.dumps(manifest))
    assert cpu_variants.why_not(Bundle(partial), "bg_unet", "int8-dynamic") == \
        "its cached step bg_unet_shallow: not built"
    assert default_variants(Bundle(partial)) == {}
