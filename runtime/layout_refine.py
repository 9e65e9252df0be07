"""Layout refinement: the layout model's proposals -> the elements a poster draws, keeping its rules.

Deterministic (no randomness; ties go to the model's order), between the layout model and the
drawing. The rules (docs/layout-json.md, "Refinement"):

1. **Canvas.** Every drawn text, logo and underlay lies inside the canvas less a margin of ``MARGIN``
   of its shorter side (a PlanNet ``product`` box is content: it stays where it was planned).
2. **Product.** A text, logo or underlay covers at most ``PRODUCT_TOLERANCE`` of its area with
   product pixels, the product grown by ``GAP`` of the shorter side (the saliency stand-in of the
   metrics blurs the product over about that distance). The product is the cutout mask; without one,
   the saliency stand-in's region: the layout's own ``product`` boxes (PlanNet), else nothing.
3. **No collisions.** Placed texts and logos do not overlap each other, and keep ``SPACING`` of the
   shorter side apart (touching boxes read as one block).
4. **Underlays** are drawn only under a placed text or logo they back (covering at least ``BACKS``
   of it), at most one per element, grown to contain it whole, cut to reach at most
   ``UNDERLAY_REACH`` of the element's height past it, and over nothing else placed.
5. **Minimal change.** Proposals are taken best score first: texts until every text line has a box,
   then one logo (when a logo is drawn), then underlays. A box that breaks a rule moves and/or
   shrinks (each side to no less than ``MIN_SCALE``) to the legal box of least cost: displacement
   over the shorter side plus the share of area lost. A text box stays at least ``MIN_TEXT_SIZE``
   wide and high (fractions of the shorter side: narrower, no word is legible). With no legal box it is
   dropped; a text line left without a box is reported in ``unplaced_texts``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .images import MASK_THRESHOLD
from .pipelines.request import LayoutElement

MARGIN = 0.02
GAP = 0.01
PRODUCT_TOLERANCE = 0.01
SPACING = 0.01
BACKS = 0.5
#: Each side keeps at least half its length: a smaller text would no longer be the one the model sized.
MIN_SCALE = 0.5
SCALES = (1.0, 0.9, 0.8, 0.7, 0.6, MIN_SCALE)
#: (width, height) under which a text box holds no legible word (fractions of the shorter side:
#: 41 x 20 px at 512): such proposals are dropped and no text box shrinks below it.
MIN_TEXT_SIZE = (0.08, 0.04)
#: Search grid of positions, as a fraction of the shorter side (5 px on a 512 canvas).
STEP = 0.01
#: When two boxes' vertical centres are closer than this fraction of the smaller height, they are on one row.
SAME_ROW = 0.5
#: Padding of an underlay rebuilt around the element it backs, as a fraction of that element's height.
UNDERLAY_PAD = 0.15
#: An underlay reaches at most this far past its element (fraction of the element's height): a
#: panel far larger than what it backs only veils the background.
UNDERLAY_REACH = 0.5

KEPT, MOVED, SHRUNK, MOVED_SHRUNK, GROWN = "kept", "moved", "shrunk", "moved+shrunk", "grown"
DROPPED, NOT_DRAWN = "dropped", "not drawn"

Box = tuple[int, int, int, int]


@dataclass
class Placement:
    """What a poster draws from a layout: ``elements`` (drawn, each with ``proposal``: its index in
    ``proposed``), ``proposed`` (the model's elements, each with its ``outcome`` and ``reason``) and
    the text lines that found no box."""
    elements: list[LayoutElement]
    proposed: list[LayoutElement]
    unplaced_texts: list[str] = field(default_factory=list)


class Room:
    """Where boxes may go on one canvas: inside the margin, off the (grown) product."""

    def __init__(self, size: tuple[int, int], product: np.ndarray | None):
        self.width, self.height = size
        short = min(size)
        margin = int(round(MARGIN * short))
        self.inner = (margin, margin, self.width - margin, self.height - margin)
        self.step = max(1, int(round(STEP * short)))
        self.spacing = int(round(SPACING * short))
        forbidden = np.zeros((self.height, self.width), bool) if product is None else grow(product, round(GAP * short))
        # integral image: the product pixels inside any box in four lookups
        self.integral = np.pad(forbidden.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def product_pixels(self, x1, y1, x2, y2):
        """Product pixels inside boxes (arrays or scalars of integer corners)."""
        s = self.integral
        return s[y2, x2] - s[y1, x2] - s[y2, x1] + s[y1, x1]

    def keep_clear(self, boxes: list[Box]) -> list[Box]:
        """Placed texts and logos grown by the spacing: what a new text or logo must not overlap."""
        s = self.spacing
        return [(x1 - s, y1 - s, x2 + s, y2 + s) for x1, y1, x2, y2 in boxes]

    def allows(self, box: Box, obstacles: list[Box]) -> bool:
        x1, y1, x2, y2 = box
        ix1, iy1, ix2, iy2 = self.inner
        if x2 - x1 < 1 or y2 - y1 < 1 or x1 < ix1 or y1 < iy1 or x2 > ix2 or y2 > iy2:
            return False
        if self.product_pixels(x1, y1, x2, y2) > PRODUCT_TOLERANCE * (x2 - x1) * (y2 - y1):
            return False
        return not any(overlap(box, other) for other in obstacles)

    def nearest(self, box: Box, obstacles: list[Box], min_size: tuple[int, int] = (1, 1)) -> Box | None:
        """The legal box closest to ``box`` (rule 5's cost), at least ``min_size`` (w, h), or None."""
        if box[2] - box[0] < min_size[0] or box[3] - box[1] < min_size[1]:
            return None
        if self.allows(box, obstacles):
            return box
        ix1, iy1, ix2, iy2 = self.inner
        x1, y1, x2, y2 = box
        cx, cy, short = (x1 + x2) / 2, (y1 + y2) / 2, min(self.width, self.height)
        width, height = min(x2 - x1, ix2 - ix1), min(y2 - y1, iy2 - iy1)  # a box wider than the room first fits it
        best, best_cost = None, np.inf
        for sx in SCALES:
            for sy in SCALES:
                w, h = max(1, int(round(width * sx))), max(1, int(round(height * sy)))
                if w < min_size[0] or h < min_size[1]:
                    continue
                lost = 1.0 - (w * h) / max(1, (x2 - x1) * (y2 - y1))
                if lost >= best_cost:
                    continue
                lefts = self._positions(cx - w / 2, ix1, ix2 - w)
                tops = self._positions(cy - h / 2, iy1, iy2 - h)
                left, top = (a.ravel() for a in np.meshgrid(lefts, tops))
                ok = self.product_pixels(left, top, left + w, top + h) <= PRODUCT_TOLERANCE * w * h
                for ox1, oy1, ox2, oy2 in obstacles:
                    ok &= (left + w <= ox1) | (left >= ox2) | (top + h <= oy1) | (top >= oy2)
                if not ok.any():
                    continue
                moved = np.hypot(left + w / 2 - cx, top + h / 2 - cy) / short
                cost = np.where(ok, moved + lost, np.inf)
                index = int(np.argmin(cost))  # first minimum: a deterministic tie-break
                if cost[index] < best_cost:
                    best_cost = float(cost[index])
                    best = (int(left[index]), int(top[index]), int(left[index]) + w, int(top[index]) + h)
        return best

    def _positions(self, start: float, low: int, high: int) -> np.ndarray:
        """Grid of corner positions in ``low..high`` through the box's own (clamped) position."""
        if high < low:
            return np.zeros(0, np.int64)
        origin = int(round(min(max(start, low), high)))
        grid = np.concatenate([np.arange(origin, low - 1, -self.step), np.arange(origin, high + 1, self.step),
                               [low, high]])
        return np.unique(grid)


def grow(region: np.ndarray, pixels: int) -> np.ndarray:
    """``region`` (bool HxW) dilated by a square of ``pixels`` on each side."""
    if pixels <= 0:
        return region
    integral = np.pad(region.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = region.shape
    ys, xs = np.arange(height), np.arange(width)
    y1, y2 = np.clip(ys - pixels, 0, height)[:, None], np.clip(ys + pixels + 1, 0, height)[:, None]
    x1, x2 = np.clip(xs - pixels, 0, width)[None, :], np.clip(xs + pixels + 1, 0, width)[None, :]
    return (integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]) > 0


def overlap(a: Box, b: Box) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def coverage(cover: Box, element: Box) -> float:
    """Share of ``element``'s area that ``cover`` covers."""
    w = max(0, min(cover[2], element[2]) - max(cover[0], element[0]))
    h = max(0, min(cover[3], element[3]) - max(cover[1], element[1]))
    area = (element[2] - element[0]) * (element[3] - element[1])
    return w * h / area if area > 0 else 0.0


def pixel_box(box) -> Box:
    return tuple(int(round(v)) for v in box)


def change(before: Box, after: Box) -> str:
    if after == before:
        return KEPT
    grew = (after[2] - after[0]) > (before[2] - before[0]) or (after[3] - after[1]) > (before[3] - before[1])
    if grew:
        return GROWN
    shrunk = (after[2] - after[0], after[3] - after[1]) != (before[2] - before[0], before[3] - before[1])
    moved = (after[0] + after[2], after[1] + after[3]) != (before[0] + before[2], before[1] + before[3])
    return MOVED_SHRUNK if moved and shrunk else SHRUNK if shrunk else MOVED


def product_region(mask: np.ndarray | None, proposals: list[LayoutElement], size: tuple[int, int]) -> np.ndarray | None:
    """Rule 2's product: the cutout mask on the canvas, else the ``product`` boxes, else None."""
    if mask is not None:
        return mask > MASK_THRESHOLD
    boxes = [pixel_box(e.box) for e in proposals if e.cls == "product"]
    if not boxes:
        return None
    region = np.zeros((size[1], size[0]), bool)
    for x1, y1, x2, y2 in boxes:
        region[max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = True
    return region


def reading_order(elements: list[LayoutElement]) -> list[LayoutElement]:
    """Rows top to bottom (boxes whose vertical centres are close share a row), left to right in a row."""
    rows: list[list[LayoutElement]] = []
    for element in sorted(elements, key=lambda e: (e.box[1] + e.box[3]) / 2):
        centre = (element.box[1] + element.box[3]) / 2
        height = element.box[3] - element.box[1]
        if rows:
            last = rows[-1][-1]
            last_centre = (last.box[1] + last.box[3]) / 2
            if abs(centre - last_centre) < SAME_ROW * min(height, last.box[3] - last.box[1]):
                rows[-1].append(element)
                continue
        rows.append([element])
    return [e for row in rows for e in sorted(row, key=lambda e: e.box[0])]


def assign_texts(elements: list[LayoutElement], texts: list[str]) -> list[str]:
    """Without refinement: set ``.text`` on the largest text boxes (ties: best score), in reading
    order; returns the text lines left unplaced."""
    text_boxes = [e for e in elements if e.cls == "text"]
    for element in text_boxes:
        element.text = None
    chosen = sorted(text_boxes, key=lambda e: (-e.area, -e.score))[:len(texts)]
    for element, text in zip(reading_order(chosen), texts):
        element.text = text
    return list(texts[len(chosen):])


def raw_layout(proposals: list[LayoutElement], texts: list[str], draw_logo: bool = False) -> Placement:
    """The model's layout drawn as proposed (``--no-refine``): texts into the largest text boxes,
    every underlay, the logo into every logo box; nothing moved or dropped."""
    proposed = [replace(e, text=None, outcome=KEPT, reason=None, proposal=None) for e in proposals]
    drawn = [replace(e, outcome=None, proposal=i) for i, e in enumerate(proposed)]
    unplaced = assign_texts(drawn, texts)
    for element in drawn:
        reason = {"text": "more text boxes than text lines" if element.text is None else None,
                  "logo": None if draw_logo else "no logo image given",
                  "embellishment": "embellishments are not drawn"}.get(element.cls)
        if reason:
            proposed[element.proposal].outcome, proposed[element.proposal].reason = NOT_DRAWN, reason
    return Placement([e for e in drawn if proposed[e.proposal].outcome == KEPT], proposed, unplaced)


def by_score(proposed: list[LayoutElement], cls: str) -> list[int]:
    return sorted((i for i, e in enumerate(proposed) if e.cls == cls), key=lambda i: -proposed[i].score)


def refine_layout(proposals: list[LayoutElement], texts: list[str], size: tuple[int, int],
                  product_mask: np.ndarray | None = None, draw_logo: bool = False) -> Placement:
    """The elements to draw for ``texts`` on a ``(width, height)`` canvas (rules in the module doc).

    ``product_mask``: float HxW on the canvas, 1 = product. ``draw_logo``: a logo image is given."""
    proposed = [replace(e, text=None, outcome=NOT_DRAWN, reason=None, proposal=None) for e in proposals]
    room = Room(size, product_region(product_mask, proposed, size))
    placed: dict[int, Box] = {}  # proposal index -> box, texts and logo

    def place(index: int) -> bool:
        min_size = tuple(int(round(f * min(size))) for f in MIN_TEXT_SIZE) if proposed[index].cls == "text" else (1, 1)
        box = room.nearest(pixel_box(proposed[index].box), room.keep_clear(list(placed.values())), min_size)
        if box is None:
            proposed[index].outcome = DROPPED
            proposed[index].reason = ("no box inside the margin, off the product, clear of placed elements "
                                      "and large enough to read")
            return False
        placed[index] = box
        proposed[index].outcome = change(pixel_box(proposed[index].box), box)
        return True

    text_indices = []
    for index in by_score(proposed, "text"):
        if len(text_indices) == len(texts):
            proposed[index].reason = "more text boxes than text lines"
        elif place(index):
            text_indices.append(index)
    logos = by_score(proposed, "logo")
    for rank, index in enumerate(logos):
        if not draw_logo:
            proposed[index].reason = "no logo image given"
        elif rank and any(i in placed for i in logos[:rank]):
            proposed[index].reason = "one logo per poster"
        else:
            place(index)
    backed: dict[int, tuple[int, Box]] = {}  # placed index -> (underlay index, underlay box)
    for index in by_score(proposed, "underlay"):
        found = back(pixel_box(proposed[index].box), placed, backed, room)
        if found is None:
            proposed[index].outcome = DROPPED
            proposed[index].reason = "backs no placed text or logo (or its element already has an underlay)"
            continue
        element, box = found
        backed[element] = (index, box)
        proposed[index].outcome = change(pixel_box(proposed[index].box), box)
    for element in proposed:
        if element.cls == "embellishment":
            element.reason = "embellishments are not drawn"
        elif element.cls == "product":  # content: drawn where it was planned
            element.outcome = KEPT

    def drawn(index: int, box) -> LayoutElement:
        return replace(proposed[index], box=tuple(float(v) for v in box), outcome=None, reason=None, proposal=index)

    texts_drawn = [drawn(i, placed[i]) for i in text_indices]
    for element, text in zip(reading_order(texts_drawn), texts):
        element.text = text
    elements = [drawn(i, box) for i, box in backed.values()]  # in drawing order: underlays, product, logo, texts
    elements += [drawn(i, e.box) for i, e in enumerate(proposed) if e.cls == "product"]
    elements += [drawn(i, box) for i, box in placed.items() if proposed[i].cls == "logo"]
    return Placement(elements + texts_drawn, proposed, list(texts[len(text_indices):]))


def back(underlay: Box, placed: dict[int, Box], backed: dict, room: Room) -> tuple[int, Box] | None:
    """(element, box) for an underlay proposal: the placed element it covers most (at least
    ``BACKS``) that has no underlay yet, and the underlay's box grown to contain it whole; when that
    box breaks a rule, the element's own box padded (the pad shrinking to 0 until it passes)."""
    candidates = [(coverage(underlay, box), index) for index, box in placed.items() if index not in backed]
    candidates = [c for c in candidates if c[0] >= BACKS]
    if not candidates:
        return None
    element = max(candidates, key=lambda c: (c[0], -c[1]))[1]
    target = placed[element]
    others = [box for index, box in placed.items() if index != element]
    others += [box for _, box in backed.values()]
    ix1, iy1, ix2, iy2 = room.inner
    height = target[3] - target[1]
    reach = int(round(UNDERLAY_REACH * height))
    union = (max(ix1, target[0] - reach, min(underlay[0], target[0])), max(iy1, target[1] - reach, min(underlay[1], target[1])),
             min(ix2, target[2] + reach, max(underlay[2], target[2])), min(iy2, target[3] + reach, max(underlay[3], target[3])))
    if room.allows(union, others):
        return element, union
    for pad in (int(round(UNDERLAY_PAD * height)), int(round(UNDERLAY_PAD * height / 2)), 0):
        box = (max(ix1, target[0] - pad), max(iy1, target[1] - pad), min(ix2, target[2] + pad), min(iy2, target[3] + pad))
        if room.allows(box, others):
            return element, box
    return None
