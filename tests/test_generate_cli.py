"""`posterrt generate` and `posterrt demo` through the real CLI entry point.

Bad inputs: one line on stderr naming the argument, exit code 2, no traceback. Good inputs (on the
tiny bundle of all twelve models): a PNG and a layout JSON, identical for the same seed.
"""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from posterrt.runtime.bundle import BUNDLE_FORMAT, MANIFEST
from posterrt.runtime.cli import main
from posterrt.runtime.contracts import CONTRACT_VERSION


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[20:80, 70:110, 3] = 255  # the product: an opaque block right of centre
    Image.fromarray(rgba, "RGBA").save(folder / "product.png")
    Image.fromarray(rgba[..., :3]).save(folder / "opaque.jpg")
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(folder / "mask.png")
    Image.fromarray(np.full((50, 50), 255, np.uint8)).save(folder / "small_mask.png")
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(folder / "empty_mask.png")
    (folder / "notes.png").write_text("this is not an image")
    Image.new("L", (4097, 4096)).save(folder / "huge.png")  # 16.78 MP, one pixel column over the limit
    # a bundle that has a manifest but no models, and one of another contract version
    empty = folder / "empty_bundle"
    empty.mkdir()
    (empty / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION,
                                              "preset": "tiny", "models": {}, "config": {}, "assets": {}}))
    old = folder / "old_bundle"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION + 7,
                                            "preset": "tiny", "models": {}}))
    return folder


def _generate(inputs, tmp_path, *extra, product="product.png", bundle="empty_bundle"):
    argv = ["generate", "--product", str(inputs / product), "--text", "Fresh juice", "--quiet",
            "--bundle", str(inputs / bundle), "--out", str(tmp_path / "poster.png"), *extra]
    return main(argv)


BAD_INPUTS = [
    # (extra args, product file, expected words in the one-line message)
    ([], "missing.png", ["--product", "does not exist"]),
    ([], "notes.png", ["--product", "not an image"]),
    ([], "huge.png", ["--product", "4097x4096", "16777216"]),
    ([], "opaque.jpg", ["--product", "no alpha channel", "--mask"]),
    (["--mask", "{inputs}/small_mask.png"], "product.png", ["--mask", "50x50", "128x96"]),
    (["--mask", "{inputs}/empty_mask.png"], "product.png", ["--mask", "no product pixel"]),
    (["--mask", "{inputs}/mask.png"], "product.png", ["--mask", "every pixel"]),
    (["--text", "x"] * 20, "product.png", ["--text", "21 lines", "20"]),
    (["--text", "   "], "product.png", ["--text", "line 2 is empty"]),
    (["--steps", "0"], "product.png", ["--steps", "1..200"]),
    (["--steps", "201"], "product.png", ["--steps", "1..200"]),
    (["--steps", "many"], "product.png", ["--steps", "'many'"]),
    (["--layout-steps", "-1"], "product.png", ["--layout-steps", "1..200"]),
    (["--guidance", "0.5"], "product.png", ["--guidance", "1..30"]),
    (["--guidance", "31"], "product.png", ["--guidance", "1..30"]),
    (["--guidance", "nan"], "product.png", ["--guidance", "finite"]),
    (["--seed", "-3"], "product.png", ["--seed"]),
    (["--size", "512"], "product.png", ["--size", "WIDTHxHEIGHT"]),
    (["--size", "500x512"], "product.png", ["--size", "multiple of 64"]),
    (["--size", "2048x512"], "product.png", ["--size", "256..1024"]),
    (["--size", "128x128"], "product.png", ["--size", "256..1024"]),
    (["--scheduler", "plms"], "product.png", ["--scheduler", "ddim"]),
    (["--timeout", "0"], "product.png", ["--timeout", "positive number of seconds"]),
    (["--timeout", "soon"], "product.png", ["--timeout", "'soon'"]),
    (["--category", " "], "product.png", ["--category"]),
    (["--style", "{inputs}/notes.png"], "product.png", ["--style", "not an image"]),
    (["--logo", "{inputs}/missing_logo.png"], "product.png", ["--logo", "does not exist"]),
    (["--threads", "0"], "product.png", ["--threads"]),
]


@pytest.mark.parametrize("extra, product, words", BAD_INPUTS, ids=[" ".join(b[0][:2]) or b[1] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(inputs, tmp_path, capsys, extra, product, words):
    extra = [arg.format(inputs=inputs) for arg in extra]
    code = _generate(inputs, tmp_path, *extra, product=product)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "poster.png").exists()


def test_layout_pipeline_does_not_need_a_cutout(inputs, tmp_path, capsys):
    # an opaque JPEG is a fine background for RADM: the run gets past input checks to the bundle
    code = _generate(inputs, tmp_path, "--pipeline", "layout", product="opaque.jpg")
    err = capsys.readouterr().err
    assert code == 2 and "lacks models" in err and "radm_backbone" in err


@pytest.mark.parametrize("bundle, words", [("empty_bundle", ["lacks models", "posterrt export"]),
                                           ("old_bundle", ["contract version", "export it again"]),
                                           ("no_such_bundle", ["does not exist"])])
def test_unusable_bundle_is_one_line_and_exit_2(inputs, tmp_path, capsys, bundle, words):
    code = _generate(inputs, tmp_path, bundle=bundle)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


@pytest.mark.parametrize("extra, words", [(["--backend", "ftp://host:1"], ["--backend", "http://HOST:PORT"]),
                                          (["--backend", "grpc://127.0.0.1:1", "--threads", "2"], ["--threads"]),
                                          (["--variants", "bg_unet"], ["--variants", "MODEL=VARIANT"]),
                                          (["--backend", "grpc://127.0.0.1:1", "--variants", "bg_unet=int8"],
                                           ["--variants", "repo build --variants"])])
def test_bad_backend_choice_is_one_line_and_exit_2(inputs, tmp_path, capsys, extra, words):
    code = _generate(inputs, tmp_path, *extra)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_no_bundle_anywhere_points_to_the_demo(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("POSTERRT_BUNDLE", raising=False)
    code = main(["generate", "--product", str(inputs / "product.png"), "--out", str(tmp_path / "poster.png")])
    err = capsys.readouterr().err
    assert code == 2 and "posterrt demo" in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_png(inputs, tmp_path, capsys):
    code = main(["generate", "--product", str(inputs / "product.png"), "--bundle", str(inputs / "empty_bundle"),
                 "--out", str(tmp_path / "poster.jpg")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and ".png" in err


def test_demo_without_torch_and_without_bundle_says_what_to_do(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes the import fail as it does when torch is not installed
    monkeypatch.setitem(sys.modules, "posterrt.export.bundle_writer", None)
    code = main(["demo", "--bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "demo"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "posterrt[export]" in err and "--bundle" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Real runs on the tiny bundle.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(request):
    return request.getfixturevalue("tiny_bundle")


RUN = ["--size", "256x256", "--steps", "2", "--quiet", "--text", "Fresh Orange Juice", "--text", "Buy 2 get 1 free"]


@pytest.mark.parametrize("pipeline", ["poster", "layout", "background", "render"])
def test_generate_writes_png_and_layout_json(bundle, inputs, tmp_path, capsys, pipeline):
    out = tmp_path / "poster.png"
    extra = ["--layout-steps", "5"] if pipeline == "render" else []
    code = main(["generate", "--product", str(inputs / "product.png"), "--pipeline", pipeline, "--bundle", str(bundle),
                 "--out", str(out), *RUN, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (256, 256) and image.mode == "RGB"
    layout = json.loads(out.with_suffix(".json").read_text())
    assert layout["format"] == "posterrt-layout" and layout["pipeline"] == pipeline
    assert (layout["width"], layout["height"], layout["seed"]) == (256, 256, 0)
    assert layout["version"] == 2 and layout["refined"] is True and layout["warnings"] == []
    for element in layout["elements"]:
        x1, y1, x2, y2 = element["box"]
        if element["class"] != "product":  # the product is content, where PlanNet planned it
            assert 5 <= x1 <= x2 <= 251 and 5 <= y1 <= y2 <= 251  # inside the 2% margin
        assert isinstance(element["class"], str) and 0 <= element["score"] <= 1
        assert set(element) <= {"class", "box", "score", "text", "proposal"}
        assert element.get("text") in (None, "Fresh Orange Juice", "Buy 2 get 1 free")
        assert layout["proposed"][element["proposal"]]["class"] == element["class"]
    for proposal in layout["proposed"]:
        assert set(proposal) <= {"class", "box", "score", "outcome", "reason"}
        assert proposal["outcome"] in ("kept", "moved", "shrunk", "moved+shrunk", "grown", "dropped", "not drawn")
    placed = [e["text"] for e in layout["elements"] if "text" in e]
    assert sorted(placed + layout["unplaced_texts"]) == (
        [] if pipeline == "background" else ["Buy 2 get 1 free", "Fresh Orange Juice"])


def test_no_refine_draws_the_proposals_as_they_are(bundle, inputs, tmp_path, capsys):
    layouts = {}
    for name, extra in (("refined", []), ("raw", ["--no-refine"])):
        out = tmp_path / name / "poster.png"
        assert main(["generate", "--product", str(inputs / "product.png"), "--pipeline", "layout", "--bundle",
                     str(bundle), "--out", str(out), *RUN, *extra]) == 0
        layouts[name] = json.loads(out.with_suffix(".json").read_text())
    raw, refined = layouts["raw"], layouts["refined"]
    assert raw["refined"] is False and refined["refined"] is True
    assert [p["box"] for p in raw["proposed"]] == [p["box"] for p in refined["proposed"]]  # the same model output
    assert {p["outcome"] for p in raw["proposed"]} <= {"kept", "not drawn"}
    for element in raw["elements"]:
        assert element["box"] == raw["proposed"][element["proposal"]]["box"]


def test_one_progress_bar_per_stage_from_the_progress_events(bundle, inputs, tmp_path, capsys):
    code = main(["generate", "--product", str(inputs / "product.png"), "--pipeline", "poster", "--bundle", str(bundle),
                 "--out", str(tmp_path / "p.png"), "--size", "256x256", "--steps", "2", "--layout-steps", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "background: 100%" in err and "2/2" in err, "the UNet loop's bar, complete"
    assert "layout: 100%" in err and "3/3" in err, "RADM's box steps, complete"
    # an empty bar reads "0step [" ("54.20step/s", a rate, must not match)
    assert "radm_head" not in err and not re.search(r"(?<![\d.])0step", err), "no empty per-model bar"


def test_a_timeout_stops_generate_with_one_line(bundle, inputs, tmp_path, capsys):
    code = main(["generate", "--product", str(inputs / "product.png"), "--pipeline", "background", "--bundle",
                 str(bundle), "--out", str(tmp_path / "p.png"), "--size", "256x256", "--steps", "200", "--quiet",
                 "--timeout", "0.3"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "deadline of 0.3 s passed in stage 'background' at step" in err and "of 200" in err


def test_unknown_variant_is_one_line_and_exit_2(bundle, inputs, tmp_path, capsys):
    code = main(["generate", "--product", str(inputs / "product.png"), "--bundle", str(bundle), "--out",
                 str(tmp_path / "p.png"), "--variants", "bg_unet=nope", *RUN])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no variant 'nope'" in err and "engines optimize" in err


def test_same_seed_same_files_other_seed_other_poster(bundle, inputs, tmp_path, capsys):
    def run(seed, name):
        out = tmp_path / name / "poster.png"
        assert main(["generate", "--product", str(inputs / "product.png"), "--bundle", str(bundle), "--seed", seed,
                     "--out", str(out), *RUN]) == 0
        return out.read_bytes(), out.with_suffix(".json").read_text()

    first, again, other = run("7", "a"), run("7", "b"), run("8", "c")
    assert first == again
    assert first[0] != other[0]


def test_demo_runs_on_an_existing_bundle(bundle, tmp_path, capsys):
    code = main(["demo", "--bundle", str(bundle), "--out", str(tmp_path / "demo"), "--size", "256x256", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "demo" / "poster.png").is_file() and (tmp_path / "demo" / "poster.json").is_file()
    assert "poster:" in captured.out and "exporting" not in captured.out


def test_demo_on_a_fresh_machine_exports_the_tiny_bundle_first(bundle, tmp_path, capsys, monkeypatch):
    """The export itself is the session's tiny bundle, copied: this checks the demo's wiring (what it
    asks export_bundle for, and that it then uses the result) without a second two-minute export."""
    import shutil

    import posterrt.export.bundle_writer as bundle_writer
    from posterrt.runtime.contracts import MODEL_NAMES

    calls = []

    def fake_export(preset, models, out, progress=True):
        calls.append((preset, list(models)))
        shutil.copytree(bundle, out)

    monkeypatch.setattr(bundle_writer, "export_bundle", fake_export)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("POSTERRT_BUNDLE", raising=False)
    code = main(["demo", "--out", str(tmp_path / "demo"), "--size", "256x256", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert calls == [("tiny", list(MODEL_NAMES))]
    assert (tmp_path / "cache" / "posterrt" / "bundles" / "tiny" / MANIFEST).is_file()
    assert (tmp_path / "demo" / "poster.png").is_file() and "exporting the tiny bundle" in captured.out


def test_out_creates_at_most_the_last_missing_folder(tmp_path):
    from posterrt.runtime.commands.generate import check_out
    from posterrt.runtime.errors import InputError
    from posterrt.runtime.images import save_png

    poster = save_png(np.zeros((8, 8, 3), np.uint8), check_out(tmp_path / "new" / "poster.png"))
    assert poster.is_file()
    with pytest.raises(InputError, match="--out: folder .*missing' does not exist; create it first"):
        save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "missing" / "deeper" / "poster.png")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, expected a folder"):
        check_out(tmp_path / "file" / "poster.png")
