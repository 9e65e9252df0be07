"""Layout refinement: each rule on a crafted layout, then every rule at once on random layouts."""
from __future__ import annotations

import numpy as np
import pytest

from posterrt.runtime import layout_refine
from posterrt.runtime.layout_refine import (DROPPED, KEPT, NOT_DRAWN, Room, assign_texts, raw_layout, reading_order,
                                            refine_layout)
from posterrt.runtime.pipelines.request import LayoutElement

SIZE = (256, 256)
MARGIN = 5  # 2% of 256, rounded
SPACING = 3  # 1% of 256, rounded


def _element(cls, box, score=0.9):
    return LayoutElement(cls, tuple(float(v) for v in box), score)


def _boxes(placement, *classes):
    return [e.box for e in placement.elements if e.cls in classes]


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _product(box=(150, 100, 230, 200)):
    mask = np.zeros((SIZE[1], SIZE[0]), np.float32)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 1.0
    return mask


def _on_product(box, mask) -> float:
    x1, y1, x2, y2 = (int(v) for v in box)
    return float((mask[y1:y2, x1:x2] > 0.5).sum()) / ((x2 - x1) * (y2 - y1))


def test_overlapping_texts_are_pulled_apart_the_better_score_stays():
    first = _element("text", (20, 20, 140, 60), score=0.9)
    second = _element("text", (40, 30, 160, 70), score=0.8)
    placement = refine_layout([second, first], ["Headline", "Second"], SIZE)
    boxes = {e.text: e.box for e in placement.elements}
    assert boxes["Headline"] == first.box  # kept where the model put it
    moved = boxes["Second"]
    assert _overlap(boxes["Headline"], moved) == 0
    # clear by the spacing, and moved no further than that: straight down, 30 + 3 px
    assert moved[1] >= first.box[3] + SPACING and moved[1] - second.box[1] <= first.box[3] - second.box[1] + SPACING + 5
    assert [e.outcome for e in placement.proposed] == ["moved", KEPT]


def test_a_box_over_the_product_is_moved_off_it():
    mask = _product()
    text = _element("text", (140, 120, 220, 150))
    placement = refine_layout([text], ["Sale"], SIZE, mask)
    box, = _boxes(placement, "text")
    assert _on_product(box, mask) <= layout_refine.PRODUCT_TOLERANCE
    assert _on_product(text.box, mask) > 0.5  # the model's box was mostly on the product
    # the nearest free place: above or below the product (80 px wide fits beside it only at half width)
    assert abs((box[0] + box[2]) / 2 - 180) < 40


def test_a_logo_over_a_text_is_moved_and_the_text_keeps_its_place():
    text = _element("text", (20, 20, 200, 80), score=0.5)
    logo = _element("logo", (150, 40, 220, 90), score=0.95)
    placement = refine_layout([logo, text], ["Sale"], SIZE, draw_logo=True)
    assert _boxes(placement, "text") == [text.box]  # texts are placed before the logo
    logo_box, = _boxes(placement, "logo")
    assert _overlap(logo_box, text.box) == 0


def test_an_underlay_with_nothing_on_it_is_dropped():
    text = _element("text", (20, 20, 140, 60))
    lonely = _element("underlay", (20, 150, 200, 220), score=0.99)
    placement = refine_layout([text, lonely], ["Sale"], SIZE)
    assert _boxes(placement, "underlay") == []
    assert placement.proposed[1].outcome == DROPPED and "backs no placed text" in placement.proposed[1].reason


def test_an_underlay_backs_one_element_whole_and_only_one_per_element():
    text = _element("text", (40, 40, 160, 80))
    under = _element("underlay", (30, 45, 150, 90), score=0.8)  # covers most of the text, not all of it
    second = _element("underlay", (35, 35, 165, 85), score=0.7)  # also backs it: one is enough
    placement = refine_layout([text, under, second], ["Sale"], SIZE)
    underlay, = _boxes(placement, "underlay")
    assert underlay[0] <= 40 and underlay[1] <= 40 and underlay[2] >= 160 and underlay[3] >= 80  # contains it
    assert [e.outcome for e in placement.proposed] == [KEPT, "grown", DROPPED]


def test_an_underlay_does_not_reach_under_another_text():
    top = _element("text", (40, 40, 200, 80), score=0.9)
    below = _element("text", (40, 90, 200, 130), score=0.8)
    wide = _element("underlay", (30, 30, 210, 120), score=0.9)  # backs `top`, would lie under `below`
    placement = refine_layout([top, below, wide], ["One", "Two"], SIZE)
    underlay, = _boxes(placement, "underlay")
    assert _overlap(underlay, below.box) == 0 and _overlap(underlay, top.box) == _overlap(top.box, top.box)


def test_a_box_outside_the_canvas_comes_inside_the_margin():
    text = _element("text", (-40, 200, 100, 290))
    placement = refine_layout([text], ["Sale"], SIZE)
    x1, y1, x2, y2 = _boxes(placement, "text")[0]
    assert x1 >= MARGIN and y1 >= MARGIN and x2 <= SIZE[0] - MARGIN and y2 <= SIZE[1] - MARGIN
    assert (x2 - x1, y2 - y1) == (140, 90)  # moved, not shrunk: it fits


def test_a_box_larger_than_the_canvas_is_shrunk_into_it():
    text = _element("text", (-50, 10, 400, 60))
    x1, y1, x2, y2 = _boxes(refine_layout([text], ["Sale"], SIZE), "text")[0]
    assert (x1, x2) == (MARGIN, SIZE[0] - MARGIN) and y2 - y1 == 50


def test_an_element_with_no_legal_box_is_dropped_and_its_text_unplaced():
    mask = np.ones((SIZE[1], SIZE[0]), np.float32)
    mask[:, :30] = 0.0  # a strip too narrow for half the box's width
    text = _element("text", (60, 60, 200, 100))
    placement = refine_layout([text], ["Sale", "More"], SIZE, mask)
    assert placement.elements == [] and placement.unplaced_texts == ["Sale", "More"]
    assert placement.proposed[0].outcome == DROPPED


def test_the_next_best_text_box_replaces_a_dropped_one():
    mask = _product((0, 0, 256, 200))  # free: a strip of 48 px under the product (gap and margin taken)
    too_tall = _element("text", (20, 20, 200, 120), score=0.9)  # half its height is still 50 px
    fits = _element("text", (20, 150, 200, 190), score=0.5)
    placement = refine_layout([too_tall, fits], ["Sale"], SIZE, mask)
    box, = _boxes(placement, "text")
    assert placement.elements[0].proposal == 1 and box[1] >= 203 and box[3] <= 251
    assert [e.outcome for e in placement.proposed] == [DROPPED, "moved"]
    assert placement.unplaced_texts == []


def test_scores_choose_the_text_boxes_and_reading_order_the_texts():
    small_best = _element("text", (20, 150, 80, 180), score=0.9)
    large_worse = _element("text", (20, 20, 230, 120), score=0.3)
    middle = _element("text", (100, 150, 230, 190), score=0.6)
    placement = refine_layout([large_worse, small_best, middle], ["Headline", "Second"], SIZE)
    texts = {e.text: e.box for e in placement.elements}
    assert texts == {"Headline": small_best.box, "Second": middle.box}  # same row: left to right
    assert placement.proposed[0].outcome == NOT_DRAWN


def test_a_legal_layout_is_left_alone():
    elements = [_element("text", (20, 20, 140, 60)), _element("underlay", (15, 15, 145, 65), 0.5),
                _element("logo", (200, 200, 240, 240), 0.4), _element("embellishment", (0, 0, 256, 256), 0.3)]
    placement = refine_layout(elements, ["Sale"], SIZE, draw_logo=True)
    assert sorted(e.box for e in placement.elements) == sorted(e.box for e in elements[:3])
    assert [e.outcome for e in placement.proposed] == [KEPT, KEPT, KEPT, NOT_DRAWN]
    assert all(e.proposal is not None and placement.proposed[e.proposal].cls == e.cls for e in placement.elements)


def test_logos_need_a_logo_image_and_one_is_enough():
    logos = [_element("logo", (20, 20, 60, 60), 0.9), _element("logo", (150, 150, 200, 200), 0.8)]
    assert refine_layout(logos, [], SIZE).elements == []
    placement = refine_layout(logos, [], SIZE, draw_logo=True)
    assert _boxes(placement, "logo") == [logos[0].box]
    assert placement.proposed[1].reason == "one logo per poster"


def test_without_a_mask_the_product_boxes_are_the_product():
    product = _element("product", (100, 60, 200, 200), 1.0)
    text = _element("text", (90, 100, 190, 140))
    placement = refine_layout([product, text], ["Sale"], SIZE)
    box, = _boxes(placement, "text")
    assert _overlap(box, product.box) == 0
    assert _boxes(placement, "product") == [product.box]
    # nothing says where the product is: the box stays
    assert _boxes(refine_layout([text], ["Sale"], SIZE), "text") == [text.box]


def test_the_raw_layout_draws_the_proposals_as_they_are():
    elements = [_element("text", (20, 20, 140, 60)), _element("text", (40, 30, 160, 70), 0.5),
                _element("underlay", (0, 200, 40, 240)), _element("logo", (-20, -20, 40, 40)),
                _element("embellishment", (0, 0, 10, 10))]
    placement = raw_layout(elements, ["One", "Two"], draw_logo=True)
    assert [e.box for e in placement.elements] == [e.box for e in elements[:4]]
    assert [e.outcome for e in placement.proposed] == [KEPT] * 4 + [NOT_DRAWN]
    assert placement.unplaced_texts == []


@pytest.mark.parametrize("seed", range(25))
def test_random_layouts_keep_every_rule(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.choice([256, 384, 512])), int(rng.choice([256, 512]))
    mask = np.zeros((height, width), np.float32)
    px, py = rng.uniform(0.2, 0.6) * width, rng.uniform(0.2, 0.6) * height
    mask[int(py):int(py + 0.35 * height), int(px):int(px + 0.3 * width)] = 1.0
    classes = ["text", "underlay", "logo", "embellishment"]
    elements = []
    for _ in range(int(rng.integers(5, 30))):
        x, y = rng.uniform(-0.1, 0.95, 2) * (width, height)
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.03, 0.25) * height
        elements.append(_element(str(rng.choice(classes)), (x, y, x + w, y + h), float(rng.random())))
    texts = [f"line {i}" for i in range(int(rng.integers(1, 5)))]
    placement = refine_layout(elements, texts, (width, height), mask, draw_logo=True)
    assert placement == refine_layout(elements, texts, (width, height), mask, draw_logo=True)  # deterministic

    margin, spacing = round(0.02 * min(width, height)), round(0.01 * min(width, height))
    front = [e for e in placement.elements if e.cls in ("text", "logo")]
    for element in placement.elements:
        x1, y1, x2, y2 = element.box
        assert x1 >= margin and y1 >= margin and x2 <= width - margin and y2 <= height - margin
        grown = Room((width, height), mask > 0.5).integral  # the product grown by the gap
        inside = grown[int(y2), int(x2)] - grown[int(y1), int(x2)] - grown[int(y2), int(x1)] + grown[int(y1), int(x1)]
        assert inside <= layout_refine.PRODUCT_TOLERANCE * (x2 - x1) * (y2 - y1)
    for i, a in enumerate(front):
        for b in front[i + 1:]:
            grown_b = (b.box[0] - spacing, b.box[1] - spacing, b.box[2] + spacing, b.box[3] + spacing)
            assert _overlap(a.box, grown_b) == 0, (a, b)
    backed = []
    for underlay in (e for e in placement.elements if e.cls == "underlay"):
        touching = [e for e in front if _overlap(underlay.box, e.box) > 0]
        assert len(touching) == 1 and _overlap(underlay.box, touching[0].box) == _overlap(touching[0].box, touching[0].box)
        backed.append(touching[0].proposal)
    assert len(backed) == len(set(backed))  # at most one underlay per element
    placed_texts = [e.text for e in reading_order([e for e in placement.elements if e.cls == "text"])]
    assert placed_texts + placement.unplaced_texts == texts



def test_an_underlay_far_larger_than_its_text_is_cut_to_reach_near_it():
    text = _element("text", (100, 100, 160, 120))  # 20 px high: the underlay reaches 10 px past it
    huge = _element("underlay", (10, 10, 246, 246))  # covers the text, and nearly the whole canvas
    underlay, = _boxes(refine_layout([text, huge], ["Sale"], SIZE), "underlay")
    assert underlay == (90, 90, 170, 130)


def test_a_text_box_too_narrow_to_read_is_dropped_for_the_next():
    sliver = _element("text", (200, 20, 218, 200), score=0.9)  # 18 px wide: under 8% of 256 (20 px)
    wide = _element("text", (20, 20, 150, 60), score=0.5)
    placement = refine_layout([sliver, wide], ["Sale"], SIZE)
    assert _boxes(placement, "text") == [wide.box]
    assert placement.proposed[0].outcome == DROPPED and "large enough to read" in placement.proposed[0].reason
    # nor does a text box shrink below it to dodge the product
    mask = _product((0, 0, 256, 240))
    low = _element("text", (20, 200, 200, 222))  # 22 px high; under the product only 8 px are free (4%: 10)
    assert refine_layout([low], ["Sale"], SIZE, mask).unplaced_texts == ["Sale"]
