"""Layout metrics on small layouts whose values are worked out by hand in the comments.

Canvases are 100 x 100 unless said otherwise, so a pixel box (10, 10, 30, 20) has normalized
anchors left .10, centre .20, right .30, top .10, middle .15, bottom .20.
"""
import json
import math

import numpy as np
import pytest
from PIL import Image

from posterrt.runtime.errors import InputError
from posterrt.runtime.metrics import (METRICS, compare_layout_metrics, layout_metrics, load_layout, make_layout,
                                      parse_layout, summarize)
from posterrt.runtime.metrics import geometry, layoutgan, posterlayout, radm, saliency
from posterrt.runtime.metrics.canvas import canvas_gray, map_on_canvas
from posterrt.runtime.metrics.sobel import gradient_magnitude, sobel


def value(tally):
    return tally.value


# ---------------------------------------------------------------- loader

def test_parse_layout_reads_boxes_and_ignores_extra_keys():
    layout = parse_layout({"format": "posterrt-layout", "image": {"width": 64, "height": 32, "path": "p.png", "dpi": 72},
                           "elements": [{"class": "text", "box": [1, 2, 3, 4], "score": 0.5, "text": "Sale", "font": "x"},
                                        {"class": "product", "box": [0, 0, 10, 10]}]}, "a.json")
    assert (layout.width, layout.height, layout.image_path) == (64, 32, "p.png")
    assert layout.classes == ("text", "product")
    np.testing.assert_array_equal(layout.boxes, [[1, 2, 3, 4], [0, 0, 10, 10]])
    assert layout.scores == (0.5, None) and layout.texts == ("Sale", None)
    assert list(layout.graphic) == [True, False]


def test_parse_layout_accepts_top_level_size_and_no_elements():
    layout = parse_layout({"width": 512, "height": 256, "elements": []})
    assert (layout.width, layout.height, len(layout), layout.image_path) == (512, 256, 0, None)
    assert layout.boxes.shape == (0, 4)


@pytest.mark.parametrize("data, field", [
    ({"elements": []}, "'image'"),
    ({"image": {"height": 10}, "elements": []}, "'image.width'"),
    ({"image": {"width": 0, "height": 10}, "elements": []}, "'image.width'"),
    ({"image": {"width": 10, "height": 10}}, "'elements'"),
    ({"image": {"width": 10, "height": 10}, "elements": [{"class": "banner", "box": [0, 0, 1, 1]}]}, "'elements[0].class'"),
    ({"image": {"width": 10, "height": 10}, "elements": [{"class": "text", "box": [0, 0, 1]}]}, "'elements[0].box'"),
    ({"image": {"width": 10, "height": 10}, "elements": [{"class": "text", "box": [5, 0, 1, 1]}]}, "'elements[0].box'"),
    ({"image": {"width": 10, "height": 10}, "elements": [{"class": "text", "box": [0, 0, "a", 1]}]}, "'elements[0].box'"),
    ({"image": {"width": 10, "height": 10}, "elements": [{"class": "text", "box": [0, 0, 1, 1], "score": "hi"}]},
     "'elements[0].score'"),
])
def test_parse_layout_names_file_and_field(data, field):
    with pytest.raises(InputError) as error:
        parse_layout(data, "run/poster_3.json")
    message = str(error.value)
    assert message.startswith("run/poster_3.json:") and field in message and "\n" not in message


def test_load_layout_reads_file_and_rejects_bad_json(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"image": {"width": 8, "height": 8}, "elements": [{"class": "logo", "box": [0, 0, 4, 4]}]}))
    assert load_layout(good).classes == ("logo",)
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="b.json: not valid JSON"):
        load_layout(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_layout(tmp_path / "missing.json")


# ---------------------------------------------------------------- geometry and Sobel

def test_union_mask_uses_pixel_centres():
    # Box x 1.4..3.6 on a 5 x 1 canvas: pixel centres 1.5, 2.5, 3.5 lie inside, 0.5 and 4.5 do not.
    mask = geometry.union_mask(np.array([[1.4, 0.0, 3.6, 1.0]]), 5, 1)
    assert mask.tolist() == [[False, True, True, True, False]]


def test_union_mask_matches_slicing_on_random_boxes():
    rng = np.random.default_rng(0)
    corners = rng.integers(-5, 45, size=(12, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(float)  # x1 y1 x2 y2
    expected = np.zeros((30, 40), bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        expected[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    np.testing.assert_array_equal(geometry.union_mask(boxes, 40, 30), expected)


def test_sobel_valid_on_a_vertical_step():
    # Columns 0-2 are 0, columns 3-5 are 10. gx at centre column c is (1+2+1) * (I[c+1] - I[c-1]):
    # centres 1..4 give 4*0, 4*10, 4*10, 4*0; rows are equal, so gy = 0.
    image = np.zeros((6, 6))
    image[:, 3:] = 10
    gx, gy = sobel(image, "valid")
    assert gx.shape == (4, 4)
    np.testing.assert_array_equal(gx, np.tile([0, 40, 40, 0], (4, 1)))
    np.testing.assert_array_equal(gy, 0)
    # The transposed image has the transposed gradients.
    gx_t, gy_t = sobel(image.T, "valid")
    np.testing.assert_array_equal(gy_t, gx.T)
    np.testing.assert_array_equal(gx_t, 0)


def test_sobel_reflect_mirrors_without_repeating_the_edge():
    # Columns [0, 0, 9]: reflect-101 pads [0 | 0 0 9 | 0], so gx = 4 * ([0-0], [9-0], [0-0]).
    image = np.tile([0.0, 0.0, 9.0], (3, 1))
    gx, gy = sobel(image, "reflect")
    np.testing.assert_array_equal(gx, np.tile([0, 36, 0], (3, 1)))
    np.testing.assert_array_equal(gy, 0)


def test_sobel_matches_a_direct_correlation_loop():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, size=(7, 9))
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    expected_x = np.array([[(image[r:r + 3, c:c + 3] * kx).sum() for c in range(7)] for r in range(5)])
    expected_y = np.array([[(image[r:r + 3, c:c + 3] * kx.T).sum() for c in range(7)] for r in range(5)])
    gx, gy = sobel(image, "valid")
    np.testing.assert_allclose(gx, expected_x, rtol=1e-12)
    np.testing.assert_allclose(gy, expected_y, rtol=1e-12)
    np.testing.assert_allclose(gradient_magnitude(image), np.hypot(expected_x, expected_y), rtol=1e-12)


def test_sobel_of_tiny_images_is_empty_not_an_error():
    assert sobel(np.ones((2, 5)), "valid")[0].shape == (0, 3)
    assert sobel(np.ones((1, 5)), "reflect")[0].shape == (1, 5)


# ---------------------------------------------------------------- PosterLayout

def test_pl_validity_counts_elements_clipped_to_the_canvas():
    # 0.1% of 100 x 100 is 10 px². text 10x10 = 100 valid; logo 2x2 = 4 invalid; a text reaching
    # past the corner keeps 5x5 = 25 inside, valid; an underlay fully outside keeps 0, invalid;
    # a zero-area text is invalid; the product is not a graphic element and is not counted. 2 / 5.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("logo", (0, 0, 2, 2)), ("text", (95, 95, 120, 120)),
                                    ("underlay", (200, 200, 300, 300)), ("text", (50, 50, 50, 60)),
                                    ("product", (0, 0, 1, 1))])
    assert posterlayout.validity(layout).total == 2 and posterlayout.validity(layout).count == 5
    assert value(posterlayout.validity(layout)) == pytest.approx(0.4)
    assert value(posterlayout.validity(make_layout(100, 100, []))) is None


def test_pl_overlap_is_pairwise_iou_over_element_count():
    # A (0,0,10,10) and B (5,0,15,10) share 5x10 = 50 of a 150 union: IoU 1/3. Logo C overlaps
    # nothing. The underlay and the embellishment are left out, and so is the invalid 3x3 text.
    # n = 3 counted elements: (1/3 + 0 + 0) / 3 = 1/9.
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("text", (5, 0, 15, 10)), ("logo", (50, 50, 60, 60)),
                                    ("underlay", (0, 0, 20, 20)), ("embellishment", (0, 0, 12, 12)),
                                    ("text", (0, 0, 3, 3))])
    assert value(posterlayout.overlap(layout)) == pytest.approx(1 / 9)
    assert value(posterlayout.overlap(make_layout(100, 100, []))) == 0.0
    assert value(posterlayout.overlap(make_layout(100, 100, [("text", (0, 0, 50, 50))]))) == 0.0


THREE = [("text", (10, 10, 30, 20)), ("logo", (13, 50, 40, 70)), ("text", (60, 80, 95, 97))]
# Normalized anchors (left, centre, right, top, middle, bottom):
#   A .10 .20 .30 | .10 .15 .20    B .13 .265 .40 | .50 .60 .70    C .60 .775 .95 | .80 .885 .97
# Smallest same-anchor gaps: A-B .03 (left), A-C .50 (left), B-C .27 (bottom).
# Per element: A min(.03, .50) = .03, B min(.03, .27) = .03, C min(.50, .27) = .27.


def test_pl_alignment_sums_log10_penalties():
    expected = 2 * -math.log10(1 - 0.03) + -math.log10(1 - 0.27)
    assert value(posterlayout.alignment(make_layout(100, 100, THREE))) == pytest.approx(expected)
    # Two boxes sharing their left edge are aligned: 0. One or no element: 0.
    aligned = make_layout(100, 100, [("text", (10, 10, 30, 20)), ("logo", (10, 50, 40, 70))])
    assert value(posterlayout.alignment(aligned)) == pytest.approx(0.0)
    assert value(posterlayout.alignment(make_layout(100, 100, [("text", (10, 10, 30, 20))]))) == 0.0
    assert value(posterlayout.alignment(make_layout(100, 100, []))) == 0.0


UNDERLAYS = [("underlay", (0, 0, 50, 50)), ("text", (10, 10, 30, 30)), ("logo", (40, 40, 60, 60)),
             ("underlay", (50, 40, 100, 100))]
# Underlay 1 holds the text entirely (400/400 = 1) and a quarter of the logo (10x10 of 20x20):
# best 1. Underlay 2 holds none of the text and 10x20 = 200 of the logo's 400: best .5.
# Strict: underlay 1 contains the text; underlay 2 contains nothing whole.


def test_pl_underlay_loose_and_strict():
    layout = make_layout(100, 100, UNDERLAYS)
    assert value(posterlayout.underlay_loose(layout)) == pytest.approx((1 + 0.5) / 2)
    assert value(posterlayout.underlay_strict(layout)) == pytest.approx((1 + 0) / 2)


def test_pl_underlay_strict_needs_all_four_sides():
    # The text sticks out on the right only (x2 60 > 50): not contained. (The public script's right-
    # side test compares the inner box with itself and would count it.)
    layout = make_layout(100, 100, [("underlay", (0, 0, 50, 50)), ("text", (10, 10, 60, 30))])
    assert value(posterlayout.underlay_strict(layout)) == 0.0


def test_pl_underlay_edge_cases():
    assert value(posterlayout.underlay_loose(make_layout(100, 100, [("text", (0, 0, 9, 9))]))) is None
    alone = make_layout(100, 100, [("underlay", (0, 0, 50, 50))])
    assert value(posterlayout.underlay_loose(alone)) == 0.0 and value(posterlayout.underlay_strict(alone)) == 0.0


def half_salient():
    # 10 x 10 canvas, left half (columns 0-4) fully salient, right half free: 50 free pixels.
    salient = np.zeros((10, 10))
    salient[:, :5] = 1.0
    return salient


def test_pl_utility_and_occlusion():
    # The text covers columns 5-9, rows 0-3: 20 free pixels of 50 -> utility .4. The logo covers
    # columns 0-4, rows 0-1: 10 salient pixels, which add no free space. A second text over the first
    # is counted once. Occlusion: 30 covered pixels, saliency sum 10 -> 1/3.
    layout = make_layout(10, 10, [("text", (5, 0, 10, 4)), ("logo", (0, 0, 5, 2)), ("text", (5, 0, 10, 2))])
    assert value(posterlayout.utility(layout, half_salient())) == pytest.approx(0.4)
    assert value(posterlayout.occlusion(layout, half_salient())) == pytest.approx(1 / 3)
    free_only = make_layout(10, 10, [("text", (5, 0, 10, 4))])
    assert value(posterlayout.occlusion(free_only, half_salient())) == 0.0


def test_pl_utility_and_occlusion_edge_cases():
    empty = make_layout(10, 10, [])
    assert value(posterlayout.utility(empty, half_salient())) == 0.0  # uses none of the free space
    assert value(posterlayout.occlusion(empty, half_salient())) is None  # hides nothing: undefined
    layout = make_layout(10, 10, [("text", (5, 0, 10, 4))])
    assert value(posterlayout.utility(layout, np.ones((10, 10)))) is None  # no free space at all
    assert value(posterlayout.utility(layout, None)) is None and value(posterlayout.occlusion(layout, None)) is None


def step_image():
    # 10 x 10 gray: columns 0-4 are 0, columns 5-9 are 100 (a vertical edge between 4 and 5).
    image = np.zeros((10, 10))
    image[:, 5:] = 100
    return image


def test_pl_readability_averages_normalized_gradient_under_text():
    # Mirrored-border Sobel: gx = 4 * (I[c+1] - I[c-1]) is 400 at columns 4 and 5, 0 elsewhere
    # (the mirrored edges repeat their neighbour); normalized by the maximum: 1 at columns 4-5.
    # Text over columns 0-5: 60 pixels, 20 of them 1 -> 1/3.
    assert value(posterlayout.readability(make_layout(10, 10, [("text", (0, 0, 6, 10))]), step_image())) == pytest.approx(1 / 3)
    # An underlay over columns 0-4 removes them: only column 5 (all 1) remains -> 1.
    on_underlay = make_layout(10, 10, [("text", (0, 0, 6, 10)), ("underlay", (0, 0, 5, 10))])
    assert value(posterlayout.readability(on_underlay, step_image())) == pytest.approx(1.0)
    # Text on the flat part only: 0.
    assert value(posterlayout.readability(make_layout(10, 10, [("text", (0, 0, 3, 10))]), step_image())) == 0.0


def test_pl_readability_edge_cases():
    assert value(posterlayout.readability(make_layout(10, 10, [("logo", (0, 0, 6, 10))]), step_image())) is None
    covered = make_layout(10, 10, [("text", (0, 0, 5, 10)), ("underlay", (0, 0, 10, 10))])
    assert value(posterlayout.readability(covered, step_image())) is None
    flat = make_layout(10, 10, [("text", (0, 0, 6, 10))])
    assert value(posterlayout.readability(flat, np.full((10, 10), 7.0))) == 0.0  # no gradient anywhere
    assert value(posterlayout.readability(flat, None)) is None


# ---------------------------------------------------------------- RADM

OVERLAPS = [("text", (0, 0, 10, 10)), ("text", (5, 0, 15, 10)), ("logo", (0, 0, 20, 20))]
# Areas 100, 100, 400. A∩B = 50, A∩C = 100, B∩C = 100. Ordered pairs, |Si ∩ Sj| / |Si|:
# A/B .5, B/A .5, A/C 1, C/A .25, B/C 1, C/B .25: sum 3.5 over 6 pairs.


def test_radm_overlap_pools_ordered_pairs():
    layout = make_layout(100, 100, OVERLAPS + [("underlay", (0, 0, 50, 50)), ("embellishment", (0, 0, 30, 30))])
    tally = radm.overlap(layout)
    assert (tally.total, tally.count) == (pytest.approx(3.5), 6)
    # A zero-area text Z: pairs (Z, *) are skipped (no |Z|), pairs (*, Z) add 0: 3.5 over 9 pairs.
    zero = make_layout(100, 100, OVERLAPS + [("text", (30, 30, 30, 40))])
    assert value(radm.overlap(zero)) == pytest.approx(3.5 / 9)
    assert value(radm.overlap(make_layout(100, 100, [("text", (0, 0, 5, 5))]))) is None
    assert value(radm.overlap(make_layout(100, 100, []))) is None


def test_radm_underlay_pools_underlays():
    # Underlays of UNDERLAYS score 1 and .5 (see above): tally 1.5 over 2 underlays.
    tally = radm.underlay(make_layout(100, 100, UNDERLAYS))
    assert (tally.total, tally.count) == (pytest.approx(1.5), 2)
    # An underlay with nothing else scores 0; one whose only neighbour has no area too.
    assert value(radm.underlay(make_layout(100, 100, [("underlay", (0, 0, 50, 50))]))) == 0.0
    assert value(radm.underlay(make_layout(100, 100, [("underlay", (0, 0, 50, 50)), ("text", (5, 5, 5, 9))]))) == 0.0
    assert value(radm.underlay(make_layout(100, 100, [("text", (0, 0, 50, 50))]))) is None


def test_radm_alignment_is_mean_natural_log():
    expected = (2 * -math.log(1 - 0.03) + -math.log(1 - 0.27)) / 3
    assert value(radm.alignment(make_layout(100, 100, THREE))) == pytest.approx(expected)
    assert value(radm.alignment(make_layout(100, 100, [("text", (10, 10, 30, 20))]))) is None
    assert value(radm.alignment(make_layout(100, 100, []))) is None


def test_radm_occupancy_over_layouts():
    layouts = [make_layout(10, 10, [("text", (0, 0, 5, 5))]), make_layout(10, 10, []),
               make_layout(10, 10, [("product", (0, 0, 5, 5))])]  # a product alone is no graphic layout
    assert summarize({"radm.occupancy": radm.occupancy(l)} for l in layouts)["radm.occupancy"].value == pytest.approx(1 / 3)


def test_radm_readability_sobel_inside_each_text_box():
    # Text over columns 2-7: 3x3 windows centred on columns 3..6 (rows 1..8). gx = 4 * (I[c+1] - I[c-1])
    # gives 0, 400, 400, 0 on every row: mean 200. A 2-pixel-wide text holds no window: skipped.
    # Text over columns 5-9 (flat 100): 0. Pooled over the two counted boxes: (200 + 0) / 2.
    layout = make_layout(10, 10, [("text", (2, 0, 8, 10)), ("text", (0, 0, 2, 10)), ("text", (5, 0, 10, 10)),
                                  ("logo", (0, 0, 10, 10))])
    tally = radm.readability(layout, step_image())
    assert (tally.total, tally.count) == (pytest.approx(200.0), 2)
    # The same edge turned horizontal, with the box turned too: the same 200 through gy.
    turned = make_layout(10, 10, [("text", (0, 2, 10, 8))])
    assert value(radm.readability(turned, step_image().T)) == pytest.approx(200.0)


def test_radm_readability_edge_cases():
    assert value(radm.readability(make_layout(10, 10, [("text", (0, 0, 2, 2))]), step_image())) is None
    assert value(radm.readability(make_layout(10, 10, []), step_image())) is None
    assert value(radm.readability(make_layout(10, 10, [("text", (2, 0, 8, 10))]), None)) is None


# ---------------------------------------------------------------- LayoutGAN++

def test_layoutgan_overlap_sums_ordered_pairs_over_elements():
    # OVERLAPS: ratios sum to 3.5 (see above) over n = 3 elements.
    assert value(layoutgan.overlap(make_layout(100, 100, OVERLAPS))) == pytest.approx(3.5 / 3)
    # A zero-area element adds 0 in both directions but counts in n: 3.5 / 4.
    zero = make_layout(100, 100, OVERLAPS + [("text", (30, 30, 30, 40))])
    assert value(layoutgan.overlap(zero)) == pytest.approx(3.5 / 4)
    # Content-agnostic: an underlay counts like any element. It holds all of A, B, C (1 each) and
    # A, B, C hold 100 + 100 + 400 of its 2500 (.24): (3.5 + 3 + .24) / 4.
    with_underlay = make_layout(100, 100, OVERLAPS + [("underlay", (0, 0, 50, 50))])
    assert value(layoutgan.overlap(with_underlay)) == pytest.approx((3.5 + 3 + 0.24) / 4)
    assert value(layoutgan.overlap(make_layout(100, 100, []))) is None


def test_layoutgan_alignment():
    expected = (2 * -math.log(1 - 0.03) + -math.log(1 - 0.27)) / 3
    assert value(layoutgan.alignment(make_layout(100, 100, THREE))) == pytest.approx(expected)
    assert value(layoutgan.alignment(make_layout(100, 100, [("text", (10, 10, 30, 20))]))) == 0.0
    assert value(layoutgan.alignment(make_layout(100, 100, []))) is None


def test_alignment_stays_finite_for_boxes_far_outside():
    layout = make_layout(100, 100, [("text", (0, 0, 10, 10)), ("text", (500, 500, 600, 600))])
    for tally in (posterlayout.alignment(layout), radm.alignment(layout), layoutgan.alignment(layout)):
        assert math.isfinite(value(tally))


# ---------------------------------------------------------------- saliency and canvas

def test_saliency_stand_in_is_a_soft_product_region():
    region = np.zeros((100, 100), bool)
    region[30:70, 30:70] = True
    soft = saliency.stand_in_from_region(region)
    assert soft.max() == pytest.approx(1.0) and soft[50, 50] == pytest.approx(1.0)
    assert soft[5, 5] == 0.0
    # Column 30 is the first product pixel; its centre is half a pixel inside the edge and the blur's
    # sigma is 2 (2% of 100): about Phi(0.25) = .6 of the plateau.
    assert 0.4 < soft[50, 30] < 0.8 and 0.0 < soft[50, 28] < soft[50, 30]
    assert not saliency.stand_in_from_region(np.zeros((8, 8), bool)).any()


def test_saliency_sources_in_order_of_preference():
    layout = make_layout(100, 100, [("product", (30, 30, 70, 70)), ("text", (0, 0, 20, 10))])
    mask = np.zeros((100, 100), np.uint8)
    mask[30:70, 30:70] = 255
    given = np.full((50, 50), 128, np.uint8)  # half size, same aspect: resized
    chosen = saliency.resolve(layout, given, mask)
    assert chosen.source == "map" and chosen.values.shape == (100, 100)
    np.testing.assert_allclose(chosen.values, 128 / 255)
    from_mask = saliency.resolve(layout, None, mask)
    from_boxes = saliency.resolve(layout, None, None)
    assert from_mask.source == "product mask" and from_boxes.source == "product boxes"
    # The product box covers exactly the mask's white square: the two stand-ins agree.
    np.testing.assert_array_equal(from_mask.values, from_boxes.values)
    assert saliency.resolve(make_layout(100, 100, [("text", (0, 0, 20, 10))])).values is None


def test_maps_of_another_aspect_and_canvases_of_another_size_are_refused():
    layout = make_layout(100, 100, [])
    with pytest.raises(InputError, match="saliency.*60x30"):
        map_on_canvas(np.zeros((30, 60), np.uint8), layout, "--saliency")
    with pytest.raises(InputError, match="float map.*0..1"):
        map_on_canvas(np.full((100, 100), 3.0), layout, "--saliency")
    with pytest.raises(InputError, match="--images.*50x100.*100x100"):
        canvas_gray(np.zeros((100, 50, 3), np.uint8), layout)


def test_canvas_gray_uses_pillow_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: L = 200 * 299 / 1000 = 59.8 -> 60 (Pillow rounds)
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    layout = make_layout(4, 4, [])
    np.testing.assert_array_equal(canvas_gray(path, layout), 60)
    np.testing.assert_array_equal(canvas_gray(rgb, layout), 60)


# ---------------------------------------------------------------- set means and comparison

def test_set_means_pool_as_each_paper_does():
    # Layout 1 = UNDERLAYS (underlays score 1 and .5), layout 2 = a lone underlay (scores 0).
    # RADM pools underlays: (1 + .5 + 0) / 3 = .5. PosterLayout averages layouts: (.75 + 0) / 2.
    layouts = [make_layout(100, 100, UNDERLAYS), make_layout(100, 100, [("underlay", (0, 0, 50, 50))])]
    means = layout_metrics(layouts)
    assert means["radm.R_und"] == pytest.approx(0.5)
    assert means["posterlayout.underlay_loose"] == pytest.approx(0.375)
    # Metrics with no image are undefined everywhere and left out of the means.
    assert "radm.R_com" not in means and "posterlayout.readability" not in means
    assert set(means) <= set(METRICS)


def test_layout_metrics_takes_json_objects_images_and_masks():
    data = {"image": {"width": 10, "height": 10}, "elements": [{"class": "text", "box": [5, 0, 10, 4]}]}
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5] = 255
    means = layout_metrics([data], images=[np.zeros((10, 10, 3), np.uint8)], masks=[mask])
    assert means["radm.R_com"] == 0.0  # a flat black canvas has no gradient
    assert means["posterlayout.readability"] == 0.0
    # The mask stand-in is 0 well right of the product: text over columns 5-9 sits partly in its halo.
    assert 0.0 < means["posterlayout.occlusion"] < 0.5


def test_layout_metrics_checks_its_arguments():
    layout = make_layout(10, 10, [])
    with pytest.raises(InputError, match="images: got 2 entries, expected one per layout \\(1\\)"):
        layout_metrics([layout], images=[None, None])
    with pytest.raises(InputError, match="layouts\\[0\\]: got int"):
        layout_metrics([3])
    with pytest.raises(InputError, match="images\\[0\\]: image for .* is 20x10"):
        layout_metrics([layout], images=[np.zeros((10, 20, 3), np.uint8)])


def test_compare_layout_metrics_knows_directions():
    reference = {"radm.R_ove": 0.2, "posterlayout.utility": 0.5, "radm.R_com": 30.0}
    candidate = {"radm.R_ove": 0.3, "posterlayout.utility": 0.6}
    deltas = compare_layout_metrics(reference, candidate)
    assert deltas["radm.R_ove"].delta == pytest.approx(0.1) and deltas["radm.R_ove"].worse  # lower is better
    assert deltas["posterlayout.utility"].delta == pytest.approx(0.1) and not deltas["posterlayout.utility"].worse
    assert deltas["radm.R_com"].delta is None and deltas["radm.R_com"].as_dict()["candidate"] is None
    assert list(deltas) == ["posterlayout.utility", "radm.R_ove", "radm.R_com"]  # table order
    with pytest.raises(InputError, match="unknown metric 'overlap'"):
        compare_layout_metrics({"overlap": 1.0}, {})


def test_every_metric_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text(encoding="utf-8")
    for name in METRICS:
        assert f"`{name}`" in text, name


# ---------------------------------------------------------------- vectorized code against plain loops

def random_layout(rng, width=64, height=48, count=7):
    classes = ["logo", "text", "underlay", "embellishment"]
    elements = []
    for _ in range(count):
        x1, y1 = rng.integers(-4, width), rng.integers(-4, height)
        elements.append((classes[rng.integers(4)], (int(x1), int(y1), int(x1 + rng.integers(0, 30)),
                                                    int(y1 + rng.integers(0, 20)))))
    return make_layout(width, height, elements)


def test_vectorized_metrics_match_loops_over_the_definitions():
    # The loops below restate the definitions element by element (as the papers' scripts do), on
    # random integer layouts, including zero-area and out-of-canvas boxes.
    rng = np.random.default_rng(7)
    for _ in range(20):
        layout = random_layout(rng)
        gray = rng.uniform(0, 255, size=(layout.height, layout.width))
        items = [(c, [float(v) for v in b]) for c, b in zip(layout.classes, layout.boxes)]

        def inter(a, b):
            return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

        def area(a):
            return (a[2] - a[0]) * (a[3] - a[1])

        # RADM R_ove
        ratios = [inter(a, b) / area(a) for i, (ca, a) in enumerate(items) for j, (cb, b) in enumerate(items)
                  if i != j and ca not in ("underlay", "embellishment") and cb not in ("underlay", "embellishment")
                  and area(a) > 0]
        tally = radm.overlap(layout)
        assert tally.count == len(ratios) and tally.total == pytest.approx(sum(ratios))
        # RADM alignment: per element, the smallest anchor gap over the others
        if len(items) >= 2:
            scores = []
            for i, (_, a) in enumerate(items):
                dx = min(min(abs(a[0] - b[0]), abs((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2), abs(a[2] - b[2]))
                         for j, (_, b) in enumerate(items) if j != i)
                dy = min(min(abs(a[1] - b[1]), abs((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2), abs(a[3] - b[3]))
                         for j, (_, b) in enumerate(items) if j != i)
                gap = min(dx / layout.width, dy / layout.height, 1 - 1e-6)
                scores.append(-math.log(1 - gap))
            assert value(radm.alignment(layout)) == pytest.approx(sum(scores) / len(scores))
        # RADM R_com: crop each text box, Sobel inside the crop only
        means = []
        for name, b in items:
            if name != "text":
                continue
            x0, y0 = max(int(b[0]), 0), max(int(b[1]), 0)
            x1, y1 = min(int(b[2]), layout.width), min(int(b[3]), layout.height)
            crop = gray[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else np.zeros((0, 0))
            if crop.shape[0] >= 3 and crop.shape[1] >= 3:
                means.append(gradient_magnitude(crop, "valid").mean())
        tally = radm.readability(layout, gray)
        assert tally.count == len(means) and tally.total == pytest.approx(sum(means))
        # PosterLayout utility on a random saliency map, with the coverage drawn box by box
        salient = rng.uniform(0, 1, size=(layout.height, layout.width))
        valid = posterlayout.valid_elements(layout)
        covered = np.zeros_like(salient, dtype=bool)
        for keep, (_, b) in zip(valid, items):
            if keep:
                covered[max(int(b[1]), 0):max(int(b[3]), 0), max(int(b[0]), 0):max(int(b[2]), 0)] = True
        expected = ((1 - salient) * covered).sum() / (1 - salient).sum()
        assert value(posterlayout.utility(layout, salient)) == pytest.approx(expected)
