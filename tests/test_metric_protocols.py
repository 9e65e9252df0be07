"""The script protocols (``posterlayout``, ``radm``) against hand-computed values, where they
disagree with the ``posterrt`` protocol (each case gives both numbers), and a property test that the
protocols agree wherever the scripts have no quirk.

Canvases are 100 x 100 unless said otherwise: a pixel box (10, 10, 30, 20) has normalized anchors
left .10, centre .20, right .30, top .10, middle .15, bottom .20. The scripts were read at
PKU-ICST-MIPL/PosterLayout-CVPR2023 eval.py (bd236f20) and liuan0803/RADM metrics.py (413f87a4);
docs/metrics.md records the runs that compared these protocols with the scripts themselves.
"""
import math

import numpy as np
import pytest

from posterrt.runtime.metrics import layout_metrics, make_layout
from posterrt.runtime.metrics import posterlayout_script as pls
from posterrt.runtime.metrics import radm_script as rs
from posterrt.runtime.metrics.protocols import PROTOCOLS
from posterrt.runtime.metrics.sobel import sobel


def both(layouts, images=None, saliency=None, family="posterlayout"):
    """(script protocol means, posterrt protocol means) over the same inputs."""
    script = layout_metrics(layouts, images=images, saliency=saliency, protocol=family)
    corrected = layout_metrics(layouts, images=images, saliency=saliency, protocol="posterrt")
    return script, corrected


def g10(gap):
    return -math.log10(1 - gap)


# ---------------------------------------------------------------- PosterLayout eval.py

def test_pl_alignment_takes_the_layouts_smallest_gap_for_every_element():
    # A and B share their left edge (gap 0); C's own smallest gap is .20 (top .70 against B's .50).
    # The script's loop ignores the element: 3 * g(0) = 0. posterrt: g(0) + g(0) + g(.2) = 0.09691.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("logo", (0, 50, 20, 60)), ("text", (30, 70, 45, 85))])
    script, corrected = both([layout])
    assert script["posterlayout.alignment"] == 0.0
    assert corrected["posterlayout.alignment"] == pytest.approx(g10(0.2)) == pytest.approx(0.09691, abs=1e-5)


def test_pl_alignment_agrees_for_two_elements():
    # Two elements: each one's smallest gap is the layout's, .2 (left .0 vs .2): 2 * g(.2) both ways.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("logo", (20, 30, 40, 50))])
    script, corrected = both([layout])
    assert script["posterlayout.alignment"] == pytest.approx(2 * g10(0.2))
    assert corrected["posterlayout.alignment"] == pytest.approx(2 * g10(0.2))


def test_pl_strict_underlay_never_checks_the_right_edge():
    # The text sticks out of the underlay on the right: the script counts it as held (1.0), posterrt
    # not (0.0). Loose: |U ∩ T| / |T| = 30 * 20 / (60 * 20) = .5 in both.
    layout = make_layout(100, 100, [("underlay", (10, 10, 50, 50)), ("text", (20, 20, 80, 40))])
    script, corrected = both([layout])
    assert (script["posterlayout.underlay_strict"], corrected["posterlayout.underlay_strict"]) == (1.0, 0.0)
    assert script["posterlayout.underlay_loose"] == pytest.approx(0.5)
    assert corrected["posterlayout.underlay_loose"] == pytest.approx(0.5)


def test_pl_validity_takes_the_absolute_clipped_area():
    # (120, 130, 140, 150) lies outside on both axes: clipped extents 100 - 120 = -20 and 100 - 130 =
    # -30, |-20 * -30| = 600 >= 10 (0.1% of the canvas): valid for the script (1.0); posterrt's
    # clipped area is 0, invalid (.5). The script then scores it: overlap divides by 2 elements.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("text", (120, 130, 140, 150))])
    script, corrected = both([layout])
    assert (script["posterlayout.validity"], corrected["posterlayout.validity"]) == (1.0, 0.5)
    assert pls.valid_mask(layout.boxes.astype(np.float32), 100, 100).tolist() == [True, True]


def test_pl_validity_threshold_is_the_scripts():
    # 513 x 750: the script's 5.13 * 7.50 * 10 = 384.75 px. 19 x 20.25 = 384.75 is valid, 19 x 20.24 not.
    boxes = np.asarray([[0, 0, 19, 20.25], [0, 0, 19, 20.24]], np.float32)
    assert pls.valid_mask(boxes, 513, 750).tolist() == [True, False]


def test_pl_scores_empty_measures_as_zero_over_all_layouts():
    # Layout 1: text across a rising edge; layout 2: a logo only (no text pixel). The script
    # counts layout 2's readability as 0 in a mean over both layouts; posterrt leaves it out.
    image = np.zeros((100, 100), np.uint8)
    image[:, 50:] = 100  # a rising step: the script's uint8 Sobel sees it
    text = make_layout(100, 100, [("text", (40, 0, 60, 100))])
    logo = make_layout(100, 100, [("logo", (0, 0, 20, 20))])
    script, corrected = both([text, logo], images=[image, image])
    # Gradient 1 (normalized) on columns 49 and 50, 0 elsewhere: 2 of the text's 20 columns.
    assert corrected["posterlayout.readability"] == pytest.approx(0.1)
    assert script["posterlayout.readability"] == pytest.approx(0.1 / 2)


def test_pl_uint8_sobel_drops_falling_edges_and_wraps_squares():
    # A falling step (100 then 0): the slope is negative, saturated to 0 in uint8, so the script's
    # gradient is 0 everywhere (max 0 -> NaN -> 0): readability 0. posterrt: 1 on 2 of 20 columns.
    falling = np.zeros((100, 100), np.uint8)
    falling[:, :50] = 100
    layout = make_layout(100, 100, [("text", (40, 0, 60, 100))])
    script, corrected = both([layout], images=[falling])
    assert script["posterlayout.readability"] == 0.0
    assert corrected["posterlayout.readability"] == pytest.approx(0.1)
    # Two rising steps, 0 -> 30 at column 30 and 30 -> 100 at column 70: Sobel slopes 4 * 30 = 120 and
    # 4 * 70 = 280 (saturated to 255). Squares wrap modulo 256: 120^2 = 14400 -> 64, 255^2 -> 1; halved
    # and rooted: sqrt(32) and sqrt(.5). The weak edge becomes the maximum (255); the strong one
    # floor(255 * sqrt(.5) / sqrt(32)) = floor(31.875) = 31. Text on columns 60..79 reads 2 columns of 31/255.
    steps = np.zeros((100, 100), np.uint8)
    steps[:, 30:] = 30
    steps[:, 70:] = 100
    gradient = pls.gradient_8bit(steps, layout)
    assert gradient[50, 29] == gradient[50, 30] == 1.0
    assert gradient[50, 69] == gradient[50, 70] == 31 / 255
    strong = make_layout(100, 100, [("text", (60, 0, 80, 100))])
    script, corrected = both([strong], images=[steps])
    assert script["posterlayout.readability"] == pytest.approx(2 * 31 / 255 / 20)
    # posterrt: float Sobel 280 is the maximum: 2 columns of 1.0.
    assert corrected["posterlayout.readability"] == pytest.approx(2 / 20)


def test_pl_negative_coordinates_slice_from_the_far_edge():
    # (-3, 0, 5, 10) on a 10 x 10 canvas: the script paints mask[0:10, -3:5] = mask[:, 7:5], nothing;
    # posterrt covers columns 0..4. Saliency: left half 1. Script: utility 0, occlusion 0 (nothing
    # covered); posterrt: utility 0 (no free pixel covered), occlusion 1.
    salient = np.zeros((10, 10), np.uint8)
    salient[:, :5] = 255
    layout = make_layout(10, 10, [("text", (-3, 0, 5, 10))])
    script, corrected = both([layout], saliency=[salient])
    assert (script["posterlayout.utility"], script["posterlayout.occlusion"]) == (0.0, 0.0)
    assert (corrected["posterlayout.utility"], corrected["posterlayout.occlusion"]) == (0.0, 1.0)
    mask = pls.box_mask(np.asarray([[-3, 0, 5, 10], [2.9, 1.9, 4.2, 3.99]]), (10, 10))
    assert mask.sum() == 2 * 2  # int() truncation: columns 2-3, rows 1-2 of the second box


def test_pl_saliency_is_the_max_of_the_maps():
    # Two maps: left half salient in one, top half in the other. Max: 3 of 4 quadrants salient. A text
    # on the bottom-right quadrant covers the only free pixels: utility 1, occlusion 0.
    left, top = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    left[:, :5] = 255
    top[:5, :] = 255
    layout = make_layout(10, 10, [("text", (5, 5, 10, 10))])
    script = layout_metrics([layout], saliency=[[left, top]], protocol="posterlayout")
    assert (script["posterlayout.utility"], script["posterlayout.occlusion"]) == (1.0, 0.0)


def test_pl_layout_without_text_or_logo_overlaps_zero():
    # The script divides 0 by 0 there (ZeroDivisionError); the protocol scores 0, as posterrt does.
    layout = make_layout(100, 100, [("underlay", (0, 0, 50, 50))])
    script, corrected = both([layout])
    assert script["posterlayout.overlap"] == corrected["posterlayout.overlap"] == 0.0


def test_pl_set_without_underlays_prints_zero():
    layout = make_layout(100, 100, [("text", (0, 0, 50, 50))])
    script, corrected = both([layout])
    assert script["posterlayout.underlay_loose"] == 0.0 and "posterlayout.underlay_loose" not in corrected


def test_pl_opencv_gray_weights():
    # 15-bit fixed point: (r * 9798 + g * 19235 + b * 3735 + 2^14) >> 15.
    rgb = np.asarray([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [255, 255, 255]]], np.uint8)
    assert pls.opencv_gray(rgb).tolist() == [[76, 150, 29, 18, 255]]


def test_pl_protocol_refuses_classes_the_benchmark_lacks():
    layout = make_layout(100, 100, [("embellishment", (0, 0, 50, 50))])
    with pytest.raises(Exception, match="class 'embellishment' has no id in the posterlayout protocol"):
        layout_metrics([layout], protocol="posterlayout")


# ---------------------------------------------------------------- RADM metrics.py

def test_radm_overlap_skips_equal_records():
    # A and A' are the same record, B overlaps half of each. Script pairs: (A,B) (B,A) (A',B) (B,A'),
    # all .5 -> .5. posterrt also counts (A,A') and (A',A) at 1: (4 * .5 + 2) / 6 = 2/3.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("text", (0, 0, 10, 10)), ("logo", (5, 0, 15, 10))])
    script, corrected = both([layout], family="radm")
    assert script["radm.R_ove"] == pytest.approx(0.5)
    assert corrected["radm.R_ove"] == pytest.approx(2 / 3)
    assert rs.overlap(layout).count == 4


def test_radm_alignment_epsilon_makes_aligned_elements_negative():
    # Same left edge: gap 0. Script: -ln(1 - 0 + 1e-6) = -9.999995e-7 per element; posterrt: 0.
    layout = make_layout(100, 100, [("text", (10, 10, 30, 20)), ("logo", (10, 50, 60, 70))])
    script, corrected = both([layout], family="radm")
    assert script["radm.R_ali"] == pytest.approx(-math.log(1 + 1e-6), rel=1e-9)
    assert script["radm.R_ali"] < 0
    assert corrected["radm.R_ali"] == 0.0


def test_radm_alignment_caps_gaps_at_the_image_size():
    # Gaps beyond the canvas (box far outside): x gap capped at W -> -ln(1e-6) = 13.8155 on x; y gap .5.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("logo", (300, 50, 310, 60))])
    assert rs.alignment(layout).value == pytest.approx(-math.log(0.5 + 1e-6))


def test_radm_readability_crop_pads_black_outside_the_image():
    # Flat gray 100 image 10 x 10; text (5, 0, 15, 10) runs 5 columns off the right edge. The script's
    # crop pads them black: columns 100 x5 then 0 x5, valid Sobel centred on crop columns 1..8 is
    # 4 * 100 = 400 at centres 4 and 5, 0 elsewhere: mean 100. posterrt clips to the canvas: flat, 0.
    gray = np.full((10, 10), 100, np.uint8)
    layout = make_layout(10, 10, [("text", (5, 0, 15, 10))])
    script, corrected = both([layout], images=[gray], family="radm")
    assert script["radm.R_com"] == pytest.approx(100.0)
    assert corrected["radm.R_com"] == 0.0


def test_radm_readability_truncates_the_width_not_the_right_edge():
    # x 2.6, w 3.8: crop columns int(2.6) = 2 .. 2 + int(3.8) = 5 -> 3 columns; posterrt's pixel
    # centres give columns 3..5 (also 3 wide) but one column to the right.
    ramp = np.tile(np.asarray([0, 0, 0, 0, 90, 90, 90, 90, 90, 90], np.uint8), (10, 1))
    layout = make_layout(10, 10, [("text", (2.6, 0, 6.4, 10))])
    script, corrected = both([layout], images=[ramp], family="radm")
    # Script: crop columns 2, 3, 4 = 0, 0, 90: one window column, gx = 4 * 90 = 360.
    assert script["radm.R_com"] == pytest.approx(360.0)
    # posterrt: columns 3, 4, 5 = 0, 90, 90: gx = 4 * 90 = 360 as well; same value, another window.
    assert corrected["radm.R_com"] == pytest.approx(360.0)


def test_radm_empty_sets_print_zero():
    layout = make_layout(100, 100, [("underlay", (0, 0, 50, 50))])
    script = layout_metrics([layout], images=[np.zeros((100, 100), np.uint8)], protocol="radm")
    assert script["radm.R_ove"] == 0.0 and script["radm.R_com"] == 0.0 and "radm.R_ali" not in script
    assert script["radm.R_und"] == 0.0  # one underlay, nothing to hold


def test_radm_readability_without_images_is_not_zero_but_missing():
    layout = make_layout(100, 100, [("text", (0, 0, 50, 50))])
    assert "radm.R_com" not in layout_metrics([layout], protocol="radm")


# ---------------------------------------------------------------- where the scripts have no quirk

def quirk_free_layout(rng, width, height, classes):
    """Integer boxes inside the canvas, each at least 4 x 4 and 0.1% of the canvas, no two equal."""
    elements, seen = [], set()
    while len(elements) < rng.integers(2, 7):
        w, h = int(rng.integers(6, width // 2)), int(rng.integers(6, height // 2))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if (x, y, w, h) in seen:
            continue
        seen.add((x, y, w, h))
        elements.append((str(rng.choice(classes)), (x, y, x + w, y + h)))
    return make_layout(width, height, elements)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_posterlayout_protocol_agrees_with_posterrt_without_quirks(seed):
    rng = np.random.default_rng(seed)
    width, height = 48, 64
    layouts = [quirk_free_layout(rng, width, height, ["text", "logo", "underlay"]) for _ in range(12)]
    # Every layout has a text or logo (overlap's n > 0) and covers some pixel.
    layouts = [l for l in layouts if not all(c == "underlay" for c in l.classes)]
    saliency = [rng.integers(0, 256, (height, width), dtype=np.uint8) for _ in layouts]
    script, corrected = both(layouts, saliency=saliency)
    for key in ("validity", "overlap", "underlay_loose", "utility", "occlusion"):
        name = f"posterlayout.{key}"
        assert script[name] == pytest.approx(corrected[name], rel=1e-6), name
    # The weaker containment test (no right edge) can only count more underlays.
    assert script["posterlayout.underlay_strict"] >= corrected["posterlayout.underlay_strict"] - 1e-12
    # Alignment: the layout's smallest gap is every element's lower bound, so the script is lower,
    # and equal on two-element layouts.
    assert script["posterlayout.alignment"] <= corrected["posterlayout.alignment"] + 1e-12
    pairs = [make_layout(width, height, list(zip(l.classes, l.boxes.tolist()))[:2]) for l in layouts]
    assert (layout_metrics(pairs, protocol="posterlayout")["posterlayout.alignment"]
            == pytest.approx(layout_metrics(pairs)["posterlayout.alignment"], rel=1e-6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radm_protocol_agrees_with_posterrt_without_quirks(seed):
    rng = np.random.default_rng(100 + seed)
    width, height = 48, 64
    layouts = [quirk_free_layout(rng, width, height, ["text", "logo", "underlay", "embellishment"])
               for _ in range(12)]
    images = [rng.integers(0, 256, (height, width), dtype=np.uint8) for _ in layouts]
    script, corrected = both(layouts, images=images, family="radm")
    for key in ("R_ove", "R_und", "occupancy", "R_com"):
        name = f"radm.{key}"
        if name in corrected:
            assert script[name] == pytest.approx(corrected[name], rel=1e-6), name
    # R_ali: -ln(1 - d + 1e-6) against -ln(1 - d): gaps stay under .5 here, so within 2e-6.
    assert script["radm.R_ali"] == pytest.approx(corrected["radm.R_ali"], abs=2e-6)


def test_unknown_protocol_names_the_argument():
    with pytest.raises(Exception, match="protocol: got 'cgl', expected one of posterrt, posterlayout, radm"):
        layout_metrics([make_layout(10, 10, [])], protocol="cgl")


def test_script_protocols_report_the_same_keys_as_posterrt():
    for name in ("posterlayout", "radm"):
        assert set(PROTOCOLS[name].metrics) <= set(PROTOCOLS["posterrt"].metrics)


def test_uint8_sobel_is_the_float_sobel_saturated():
    # The identity the posterlayout protocol relies on: cv2.Sobel(uint8, -1, ...) saturates the exact
    # integer slope; checked against cv2 in docs/metrics.md, here against a direct loop.
    image = np.random.default_rng(3).integers(0, 256, (7, 9)).astype(np.float64)
    gx, _ = sobel(image, "reflect")
    padded = np.pad(image, 1, mode="reflect")
    loop = np.array([[padded[r:r + 3, c:c + 3] @ [-1, 0, 1] @ [1, 2, 1] for c in range(9)] for r in range(7)])
    np.testing.assert_array_equal(gx, loop)
