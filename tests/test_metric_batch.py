"""Benchmark-style batch input: normalized ltrb boxes and class ids as .npz / .npy / JSON, through the
API and `posterrt eval-layout`, and the one-line errors for bad batches (never unpickled)."""
import json

import numpy as np
import pytest
from PIL import Image

from posterrt.runtime.cli import main
from posterrt.runtime.errors import InputError
from posterrt.runtime.metrics import layout_metrics
from posterrt.runtime.metrics.batch import batch_layouts, parse_canvas, parse_class_map, read_batch
from posterrt.runtime.metrics.posterlayout_script import CLASS_IDS as PKU

# Two layouts of a 100 x 200 canvas, K = 3 slots, 0 = empty. Layout 0: text (.1,.1)-(.5,.2) and an
# underlay holding it; layout 1: one logo, two empty slots.
BOXES = np.asarray([[[0.1, 0.1, 0.5, 0.2], [0.05, 0.05, 0.6, 0.25], [0, 0, 0, 0]],
                    [[0.2, 0.5, 0.4, 0.6], [0, 0, 0, 0], [0.9, 0.9, 0.1, 0.1]]], np.float32)
CLASSES = np.asarray([[1, 3, 0], [2, 0, 0]])


def test_batch_layouts_scale_to_the_canvas_and_drop_empty_slots():
    layouts = batch_layouts(BOXES, CLASSES[..., None], PKU, (100, 200), names=["a.png", "b.png"])
    assert [l.classes for l in layouts] == [("text", "underlay"), ("logo",)]
    np.testing.assert_allclose(layouts[0].boxes[0], [10, 20, 50, 40], rtol=1e-6)
    assert layouts[1].image_path == "b.png" and (layouts[1].width, layouts[1].height) == (100, 200)
    # Pixels are the float32 product, as the script's in-place multiply: 0.1f * 100 exactly.
    assert layouts[0].boxes[0, 0] == float(np.float32(0.1) * np.float32(100))


def test_npz_npy_and_json_batches_read_the_same(tmp_path):
    np.savez(tmp_path / "b.npz", boxes=BOXES, classes=CLASSES, names=np.asarray(["a.png", "b.png"]), canvas=[100, 200])
    np.save(tmp_path / "boxes.npy", BOXES)
    np.save(tmp_path / "classes.npy", CLASSES)
    (tmp_path / "b.json").write_text(json.dumps({"boxes": BOXES.astype(float).tolist(), "classes": CLASSES.tolist(),
                                                 "canvas": [100, 200], "class_map": {"1": "text", "2": "logo",
                                                                                     "3": "underlay"}}))
    from_npz = read_batch(tmp_path / "b.npz", PKU)
    from_npy = read_batch(tmp_path / "boxes.npy", PKU, classes_path=tmp_path / "classes.npy", canvas=(100, 200))
    from_json = read_batch(tmp_path / "b.json", {})
    assert from_npz.names == ["a.png", "b.png"] and from_npy.names is None
    for batch in (from_npy, from_json):
        assert [l.classes for l in batch.layouts] == [l.classes for l in from_npz.layouts]
        for a, b in zip(batch.layouts, from_npz.layouts):
            np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-6)
    means = layout_metrics(from_npz.layouts, protocol="posterlayout")
    # Text 40 x 20 inside the underlay 55 x 40: loose 1, strict 1 (the one layout with an underlay).
    assert means["posterlayout.underlay_loose"] == pytest.approx(1.0)
    assert means["posterlayout.validity"] == 1.0


def test_ragged_json_batches_and_class_maps(tmp_path):
    path = tmp_path / "ragged.json"
    path.write_text(json.dumps({"boxes": [[[0.1, 0.1, 0.2, 0.2]], []], "classes": [[4], []]}))
    batch = read_batch(path, {}, class_map=parse_class_map("4=embellishment"), canvas=parse_canvas("10x20"))
    assert [l.classes for l in batch.layouts] == [("embellishment",), ()]


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "x.npy", np.asarray([{"a": 1}], dtype=object)), "holds no plain numeric array"),
    (lambda d: (d / "x.pt").write_bytes(b"\x80\x02"), "is a pickle (.pt); posterrt never unpickles input"),
    (lambda d: (d / "x.pkl").write_bytes(b"\x80\x02"), "is a pickle (.pkl)"),
])
def test_pickles_are_refused_without_loading(tmp_path, make, message):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_batch(path, PKU, classes_path=None, canvas=(10, 10))


@pytest.mark.parametrize("boxes, classes, message", [
    (BOXES, np.asarray([[1, 7, 0], [2, 0, 0]]), r"classes\[0\]\[1\]: id 7 is not in the class map"),
    (BOXES[:, :, ::-1], CLASSES, r"boxes\[0\]\[0\]: .* expected right >= left"),
    (BOXES, CLASSES[:1], r"classes: 1 layouts, expected one per layout of boxes \(2\)"),
    (BOXES[..., :3], CLASSES, r"boxes: got a float32 array of shape \(2, 3, 3\), expected numbers \[N, K, 4\]"),
])
def test_bad_batches_name_the_field(boxes, classes, message):
    with pytest.raises(InputError, match=message):
        batch_layouts(boxes, classes, PKU, (100, 200))


def test_bad_class_map_and_canvas():
    with pytest.raises(InputError, match="--class-map: id 1 maps to 'banner'"):
        parse_class_map("1=banner")
    with pytest.raises(InputError, match="--class-map: id 0 is the empty slot"):
        parse_class_map("0=text")
    with pytest.raises(InputError, match="--canvas: got '513', expected the canvas size as WIDTHxHEIGHT"):
        parse_canvas("513")


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_cli_scores_a_batch_with_each_protocol(tmp_path, capsys):
    np.savez(tmp_path / "b.npz", boxes=BOXES, classes=CLASSES)
    (tmp_path / "names.txt").write_text("a.png\nb.png\n")
    for name in ("a.png", "b.png"):
        save(tmp_path / "images" / name, np.zeros((200, 100, 3)))
        save(tmp_path / "pfpn" / name.replace(".", "_pred."), np.zeros((200, 100)))  # PFPN's naming
        save(tmp_path / "basnet" / name, np.full((200, 100), 255))
    reports = {}
    for protocol in ("posterrt", "posterlayout", "radm"):
        out = tmp_path / f"{protocol}.json"
        code = main(["eval-layout", "--layouts", str(tmp_path / "b.npz"), "--names", str(tmp_path / "names.txt"),
                     "--canvas", "100x200", "--images", str(tmp_path / "images"), "--saliency", str(tmp_path / "pfpn"),
                     "--saliency", str(tmp_path / "basnet"), "--protocol", protocol, "--out", str(out)])
        assert code == 0
        reports[protocol] = json.loads(out.read_text())
        assert reports[protocol]["protocol"]["name"] == protocol
    assert f"protocol radm; report: {tmp_path / 'radm.json'}" in capsys.readouterr().out
    assert set(reports["radm"]["means"]) == {"radm.R_ove", "radm.R_und", "radm.R_ali", "radm.occupancy", "radm.R_com"}
    # BASNet's map is all 255: the max is salient everywhere, so the elements sit on saliency 1.
    assert reports["posterlayout"]["means"]["posterlayout.occlusion"] == 1.0
    assert reports["posterlayout"]["means"]["posterlayout.utility"] == 0.0
    assert reports["posterrt"]["means"]["posterlayout.utility"] is None  # posterrt: no free space, undefined
    assert reports["posterlayout"]["layouts"][0]["image"].endswith("a.png")


def test_cli_batch_errors_are_one_line(tmp_path, capsys):
    np.savez(tmp_path / "b.npz", boxes=BOXES, classes=CLASSES)
    code = main(["eval-layout", "--layouts", str(tmp_path / "b.npz"), "--images", str(tmp_path), "--canvas", "100x200",
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --names: the batch has no image names") and err.count("\n") == 1
    code = main(["eval-layout", "--layouts", str(tmp_path / "b.npz"), "--protocol", "cgl", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "--protocol: got 'cgl', expected one of posterrt, posterlayout, radm" in capsys.readouterr().err


def test_batch_without_a_canvas_takes_each_images_size(tmp_path, capsys):
    # RADM's script reads each image's size; a batch without --canvas under radm does the same.
    np.savez(tmp_path / "b.npz", boxes=BOXES, classes=CLASSES, names=np.asarray(["a.png", "b.png"]))
    save(tmp_path / "images" / "a.png", np.zeros((200, 100)))
    save(tmp_path / "images" / "b.png", np.zeros((40, 50)))
    out = tmp_path / "r.json"
    assert main(["eval-layout", "--layouts", str(tmp_path / "b.npz"), "--images", str(tmp_path / "images"),
                 "--protocol", "radm", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["means"]["radm.occupancy"] == 1.0
    # Without images, names or --canvas there is no canvas: one line naming --canvas.
    np.savez(tmp_path / "c.npz", boxes=BOXES, classes=CLASSES)
    assert main(["eval-layout", "--layouts", str(tmp_path / "c.npz"), "--out", str(out)]) == 2
    assert "error: --canvas: no canvas size for layout 0 of c.npz" in capsys.readouterr().err
    # Under posterlayout the script's 513 x 750 is the default canvas.
    assert main(["eval-layout", "--layouts", str(tmp_path / "c.npz"), "--protocol", "posterlayout",
                 "--out", str(out)]) == 0


def test_coco_results_as_radm_writes_them(tmp_path, capsys):
    # RADM's own files: coco_instances_results.json (pixel x, y, w, h) and test.json (the images, in
    # the order image_id counts them). Image 0: text A, its exact duplicate A', a logo B over half of
    # each; image 1: nothing; image 2: the same text box twice with different scores (unequal records).
    images = [{"file_name": name, "id": 10 + i, "width": 100, "height": 100} for i, name in enumerate("abc")]
    (tmp_path / "test.json").write_text(json.dumps({"images": images}))
    text = {"bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.9}
    results = [dict(text, image_id=0), dict(text, image_id=0),
               {"image_id": 0, "bbox": [5, 0, 10, 10], "category_id": 2, "score": 0.5},
               dict(text, image_id=2), dict(text, image_id=2, score=0.8)]
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "r.json"
    assert main(["eval-layout", "--layouts", str(tmp_path / "results.json"), "--names", str(tmp_path / "test.json"),
                 "--protocol", "radm", "--out", str(out)]) == 0
    means = json.loads(out.read_text())["means"]
    # R_ove: image 0 gives 4 pairs of .5 (A-A' skipped), image 2 two pairs of 1: (2 + 2) / 6.
    assert means["radm.R_ove"] == pytest.approx(2 / 3)
    assert means["radm.occupancy"] == pytest.approx(2 / 3)  # 2 of 3 images have a prediction
    results[1]["image_id"] = 3
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["eval-layout", "--layouts", str(tmp_path / "results.json"), "--names", str(tmp_path / "test.json"),
                 "--protocol", "radm", "--out", str(out)]) == 2
    assert "results.json[1].image_id: got 3, expected the position of an image in --names (0..2)" in capsys.readouterr().err
    assert main(["eval-layout", "--layouts", str(tmp_path / "results.json"), "--out", str(out)]) == 2
    assert "--names: " in capsys.readouterr().err
