"""`posterrt eval-layout` end to end on two tiny layouts whose metric values are worked out by hand."""
import json

import numpy as np
import pytest
from PIL import Image

from posterrt.runtime.cli import main


def save_gray(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path):
    """Two 10 x 10 layouts over the same canvas: columns 0-4 black, 5-9 gray 100 (one vertical edge).

    a.json names its image (renders/poster_a.png -> matched by file name), b.json uses the
    top-level size that PosterResult.layout_json writes and is matched by its stem (b.png)."""
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    (layouts / "a.json").write_text(json.dumps({
        "image": {"width": 10, "height": 10, "path": "renders/poster_a.png"},
        "elements": [{"class": "text", "box": [2, 0, 8, 10], "score": 0.9, "text": "Sale"}]}))
    (layouts / "b.json").write_text(json.dumps({
        "format": "posterrt-layout", "version": 1, "width": 10, "height": 10,
        "elements": [{"class": "text", "box": [5, 0, 10, 10], "score": 0.8}]}))
    step = np.zeros((10, 10, 3), np.uint8)
    step[:, 5:] = 100
    images = tmp_path / "images"
    save_gray(images / "poster_a.png", step)
    save_gray(images / "b.png", step)
    return tmp_path


def run_cli(capsys, *args):
    code = main(["eval-layout", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_has_hand_computed_means(dataset, capsys):
    out = dataset / "report.json"
    code, stdout, _ = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images", "--out", out)
    assert code == 0
    report = json.loads(out.read_text())
    means, n = report["means"], report["n"]
    # RADM R_com, pooled over text boxes. a: text over columns 2-7, Sobel windows centred on 3..6
    # see 4 * (I[c+1] - I[c-1]) = 0, 400, 400, 0 -> 200. b: columns 5-9 are flat -> 0. (200 + 0) / 2.
    assert means["radm.R_com"] == pytest.approx(100.0) and n["radm.R_com"] == 2
    # PosterLayout readability: the normalized gradient is 1 on columns 4 and 5, 0 elsewhere.
    # a: 2 of 6 columns -> 1/3; b: 1 of 5 -> 1/5. Mean over layouts: 4/15.
    assert means["posterlayout.readability"] == pytest.approx(4 / 15)
    assert means["radm.occupancy"] == 1.0 and means["posterlayout.validity"] == 1.0
    # No saliency map, mask or product box: utility and occlusion are undefined everywhere.
    assert means["posterlayout.utility"] is None and n["posterlayout.utility"] == 0
    assert [row["image"].endswith(name) for row, name in zip(report["layouts"], ("poster_a.png", "b.png"))] == [True, True]
    assert report["layouts"][0]["values"]["radm.R_com"] == pytest.approx(200.0)
    assert report["layouts"][0]["saliency"] is None
    assert report["metrics"]["radm.R_com"]["better"] == "lower"
    # The table: a header, one row per metric with its mean and n.
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.strip()}
    assert rows["radm.R_com"][1:] == ["lower", "100.0000", "2"]
    assert rows["posterlayout.utility"][1:] == ["higher", "-", "0"]


def test_saliency_maps_feed_utility_and_occlusion(dataset, capsys):
    # Maps matched like images (poster_a.png by name, b.png by stem); left half salient (255).
    half = np.zeros((10, 10), np.uint8)
    half[:, :5] = 255
    save_gray(dataset / "saliency" / "poster_a.png", half)
    save_gray(dataset / "saliency" / "b.png", half)
    out = dataset / "report.json"
    code, _, _ = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images",
                         "--saliency", dataset / "saliency", "--out", out)
    assert code == 0
    report = json.loads(out.read_text())
    # a covers columns 2-7: free columns 5-7 = 30 of 50 free pixels (.6); salient 30 of 60 covered (.5).
    # b covers columns 5-9: all 50 free pixels (1); nothing salient (0).
    assert report["means"]["posterlayout.utility"] == pytest.approx((0.6 + 1.0) / 2)
    assert report["means"]["posterlayout.occlusion"] == pytest.approx((0.5 + 0.0) / 2)
    assert report["layouts"][1]["saliency"].startswith("map ") and report["layouts"][1]["saliency"].endswith("b.png")


def test_masks_give_the_stand_in(dataset, capsys):
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5] = 255
    save_gray(dataset / "masks" / "poster_a.png", mask)
    save_gray(dataset / "masks" / "b.png", mask)
    out = dataset / "report.json"
    code, _, _ = run_cli(capsys, "--layouts", dataset / "layouts" / "b.json", "--images", dataset / "images",
                         "--masks", dataset / "masks", "--out", out)
    assert code == 0
    report = json.loads(out.read_text())
    assert len(report["layouts"]) == 1 and report["layouts"][0]["saliency"].startswith("product mask ")
    # b's text lies right of the product: it only meets the blurred halo, so occlusion is small but > 0.
    assert 0.0 < report["means"]["posterlayout.occlusion"] < 0.5


def test_missing_image_is_a_one_line_error(dataset, capsys):
    (dataset / "images" / "b.png").unlink()
    code, _, stderr = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images",
                              "--out", dataset / "r.json")
    assert code == 2
    assert stderr.startswith("error: --images: no file for layout") and "b.json" in stderr and "b.png" in stderr
    assert stderr.count("\n") == 1


def test_missing_saliency_map_is_an_error(dataset, capsys):
    save_gray(dataset / "saliency" / "poster_a.png", np.zeros((10, 10)))
    code, _, stderr = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images",
                              "--saliency", dataset / "saliency", "--out", dataset / "r.json")
    assert code == 2 and "--saliency: no file for layout" in stderr and "b.json" in stderr


def test_invalid_layout_names_file_and_field(dataset, capsys):
    (dataset / "layouts" / "b.json").write_text(json.dumps({"width": 10, "height": 10,
                                                            "elements": [{"class": "banner", "box": [0, 0, 1, 1]}]}))
    code, _, stderr = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images",
                              "--out", dataset / "r.json")
    assert code == 2 and "b.json: field 'elements[0].class' is 'banner'" in stderr


def test_image_of_another_size_is_refused(dataset, capsys):
    save_gray(dataset / "images" / "b.png", np.zeros((12, 10)))
    code, _, stderr = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images",
                              "--out", dataset / "r.json")
    assert code == 2 and "is 10x12, expected the layout's canvas 10x10" in stderr


def test_empty_folder_and_report_inside_the_layout_folder(dataset, capsys):
    empty = dataset / "empty"
    empty.mkdir()
    code, _, stderr = run_cli(capsys, "--layouts", empty, "--images", dataset / "images", "--out", dataset / "r.json")
    assert code == 2 and "holds no *.json" in stderr
    # Writing the report among the layouts, twice: the second run must not read the report as a layout.
    inside = dataset / "layouts" / "report.json"
    for _ in range(2):
        code, _, stderr = run_cli(capsys, "--layouts", dataset / "layouts", "--images", dataset / "images", "--out", inside)
        assert code == 0, stderr
    assert len(json.loads(inside.read_text())["layouts"]) == 2
