"""Poster composition: which text goes in which box, fitting, contrast, underlays, logos, fonts."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from posterrt.runtime import compose
from posterrt.runtime.compose import (compose_poster, contrast_ratio, find_font, fit_text, is_cjk, relative_luminance,
                                      text_colour)
from posterrt.runtime.layout_refine import assign_texts, reading_order
from posterrt.runtime.pipelines.request import LayoutElement


def _element(cls, box, score=0.9):
    return LayoutElement(cls, tuple(float(v) for v in box), score)


def _noise_background(seed=0, size=(256, 256)):
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def test_reading_order_is_rows_then_left_to_right():
    right_top = _element("text", (150, 10, 240, 40))
    left_top = _element("text", (10, 14, 120, 44))  # same row as right_top: centres 4 px apart
    middle = _element("text", (60, 100, 200, 130))
    bottom = _element("text", (10, 200, 100, 230))
    assert reading_order([bottom, middle, right_top, left_top]) == [left_top, right_top, middle, bottom]


def test_texts_fill_the_largest_boxes_in_reading_order():
    small_top = _element("text", (0, 0, 40, 10))  # smallest: dropped when there are more boxes than texts
    big_bottom = _element("text", (0, 150, 200, 220))
    mid_top = _element("text", (0, 20, 150, 60))
    logo = _element("logo", (200, 0, 250, 50))
    unplaced = assign_texts([small_top, big_bottom, mid_top, logo], ["Headline", "Subtitle"])
    assert unplaced == []
    assert mid_top.text == "Headline" and big_bottom.text == "Subtitle"
    assert small_top.text is None and logo.text is None


def test_texts_left_over_are_reported():
    only = _element("text", (0, 0, 100, 30))
    unplaced = assign_texts([only, _element("underlay", (0, 0, 100, 30))], ["one", "two", "three"])
    assert only.text == "one" and unplaced == ["two", "three"]


def test_fitted_font_fills_the_box_and_shrinks_for_longer_text():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font_path = find_font(cjk=False)
    box = (200, 60)
    _, short_lines, short_size = fit_text("Sale", box, font_path, draw)
    _, long_lines, long_size = fit_text("Summer sale: everything half price this week", box, font_path, draw)
    assert long_size < short_size and len(long_lines) > 1
    for text in ("Sale", "Summer sale: everything half price this week"):
        font, lines, size = fit_text(text, box, font_path, draw)
        left, top, right, bottom = compose.text_block(lines, font, size, draw)
        assert right - left <= box[0] and bottom - top <= box[1]
        # close to the largest size that fits, found by trying every size
        fits = [candidate for candidate in range(compose.MIN_FONT_PX, box[1] + 1)
                if _fits(text, candidate, box, font_path, draw)]
        assert size >= 0.9 * max(fits)


def _fits(text, size, box, font_path, draw):
    font = compose.load_font(font_path, size)
    lines = compose.wrap(text, font, box[0] - 2 * compose.stroke_width(size), draw, break_words=False)
    if lines is None:
        return False
    left, top, right, bottom = compose.text_block(lines, font, size, draw)
    return right - left <= box[0] and bottom - top <= box[1]


def test_words_stay_whole_when_any_size_allows_it():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    words = "Fresh Orange Juice".split()
    _, lines, _ = fit_text("Fresh Orange Juice", (120, 200), find_font(cjk=False), draw)  # tall, narrow box
    assert len(lines) > 1 and all(word in words for line in lines for word in line.split())
    assert " ".join(lines).split() == words
    # a box too narrow for the longest word even at the smallest size breaks it
    _, lines, size = fit_text("Supercalifragilistic", (30, 200), find_font(cjk=False), draw)
    assert len(lines) > 1 and "".join(lines) == "Supercalifragilistic"


def test_text_colour_contrasts_with_the_region():
    dark = np.full((10, 10, 3), 20, np.uint8)
    light = np.full((10, 10, 3), 235, np.uint8)
    assert text_colour(dark)[0] == (255, 255, 255)
    assert text_colour(light)[0] == (0, 0, 0)
    for region in (dark, light, np.full((4, 4, 3), (200, 30, 40), np.uint8)):
        fill, _ = text_colour(region)
        # WCAG AA for large text asks for 3:1; black or white always reaches it against a flat colour
        assert contrast_ratio(relative_luminance(region), relative_luminance(np.array(fill, np.uint8))) >= 3.0


def test_composition_draws_only_inside_boxes():
    background = _noise_background()
    text_box = _element("text", (20, 20, 200, 70))
    underlay = _element("underlay", (10, 150, 120, 200))
    text_box.text = "Fresh juice"
    out = compose_poster(background, [text_box, underlay])
    changed = np.any(out != background, axis=2)
    inside = np.zeros_like(changed)
    for box in (text_box.box, underlay.box):
        x1, y1, x2, y2 = (int(v) for v in box)
        inside[y1:y2, x1:x2] = True
    assert changed[inside].mean() > 0.05  # something was drawn
    assert not changed[~inside].any()  # and nothing outside the boxes


def test_underlay_evens_out_a_busy_background():
    background = _noise_background(1)
    box = (40, 40, 200, 120)
    out = compose_poster(background, [_element("underlay", box)])
    before = background[40:120, 40:200].astype(float).std()
    after = out[40:120, 40:200].astype(float).std()
    assert after < 0.5 * before


def test_logo_is_pasted_into_logo_boxes_only_when_given():
    background = np.full((128, 128, 3), 255, np.uint8)
    logo = np.zeros((32, 64, 4), np.uint8)
    logo[..., 0], logo[..., 3] = 200, 255  # opaque red, 2:1
    element = _element("logo", (10, 10, 110, 110))
    assert np.array_equal(compose_poster(background, [element]), background)
    out = compose_poster(background, [element], logo=logo)
    red = (out[..., 0] == 200) & (out[..., 1] == 0)
    ys, xs = np.nonzero(red)
    assert xs.min() >= 10 and xs.max() < 110 and ys.min() >= 10 and ys.max() < 110
    assert xs.max() - xs.min() + 1 == 100  # scaled to the box width, aspect kept (height 50)
    assert abs((ys.max() - ys.min() + 1) - 50) <= 1


def test_cjk_text_is_detected_and_composed():
    assert is_cjk("限时特惠") and is_cjk("Sale 五折") and not is_cjk("Summer sale 50%")
    background = np.full((128, 256, 3), 240, np.uint8)
    element = _element("text", (10, 10, 240, 100))
    element.text = "限时特惠 买一送一"
    out = compose_poster(background, [element])
    assert (out != background).any()  # drawn with a CJK font when one is installed, else the fallback


def test_font_search_finds_files_that_exist():
    from pathlib import Path

    for cjk in (False, True):
        path = find_font(cjk)  # None means Pillow's built-in font is used
        assert path is None or Path(path).is_file()


@pytest.mark.skipif(find_font(cjk=True) is None, reason="no CJK font installed (apt-get install fonts-wqy-zenhei)")
def test_cjk_glyphs_are_real_glyphs():
    """A font without CJK glyphs draws the same empty box for every character: two different
    four-character texts would then give identical pixels. A CJK font draws them differently."""
    background = np.full((80, 240, 3), 255, np.uint8)
    drawn = []
    for text in ("限时特惠", "买一送一"):
        element = _element("text", (0, 0, 240, 80))
        element.text = text
        drawn.append(compose_poster(background, [element]))
    assert not np.array_equal(drawn[0], drawn[1])


def test_composition_is_deterministic():
    background = _noise_background(2)
    elements = [_element("underlay", (10, 10, 200, 90)), _element("text", (20, 20, 190, 80))]
    assign_texts(elements, ["Same every time"])
    assert np.array_equal(compose_poster(background, elements), compose_poster(background, elements))


@pytest.mark.parametrize("box", [(0, 0, 1, 1), (-50, -50, -10, -10), (250, 250, 400, 400)])
def test_degenerate_and_outside_boxes_are_skipped(box):
    background = _noise_background(3)
    element = _element("text", box)
    element.text = "x"
    out = compose_poster(background, [element])
    assert out.shape == background.shape


def test_cjk_without_a_cjk_font_warns_once_in_one_line_and_records_it(monkeypatch, caplog):
    latin_font = find_font(cjk=False)
    monkeypatch.setattr(compose, "find_font", lambda cjk: None if cjk else latin_font)
    monkeypatch.setattr(compose, "_warned", set())  # as in a fresh process
    background = np.full((128, 256, 3), 240, np.uint8)
    proposals = [_element("text", (10, 10, 240, 60)), _element("text", (10, 70, 240, 120), 0.5)]
    with caplog.at_level("WARNING", logger="posterrt"):
        first = compose.compose(background, proposals, ["限时特惠", "Sale"])
        again = compose.compose(background, proposals, ["买一送一"])
        latin = compose.compose(background, proposals, ["Sale"])
    message = compose.NO_CJK_FONT
    assert first.warnings == again.warnings == [message] and latin.warnings == []
    assert "fonts-wqy-zenhei" in message and "fonts-noto-cjk" in message and "\n" not in message
    assert [r.getMessage() for r in caplog.records] == [f"warning: {message}"]  # once per process


def test_compose_refines_unless_told_not_to():
    background = _noise_background(3)
    overlapping = [_element("text", (20, 20, 200, 80), 0.9), _element("text", (40, 40, 220, 100), 0.8)]
    refined = compose.compose(background, overlapping, ["One", "Two"])
    raw = compose.compose(background, overlapping, ["One", "Two"], refine=False)
    a, b = (e.box for e in refined.placement.elements)
    assert min(a[3], b[3]) <= max(a[1], b[1]) or min(a[2], b[2]) <= max(a[0], b[0])  # apart
    assert [e.box for e in raw.placement.elements] == [e.box for e in overlapping]
    assert not np.array_equal(refined.image, raw.image)
