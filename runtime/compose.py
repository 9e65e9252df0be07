"""Poster composition: texts, underlays and a logo drawn with Pillow into the boxes that
``layout_refine`` placed (which element is drawn where, and which text goes in which box).

Rules (also in docs/layout-json.md):

* **Readability.** Underlay boxes are painted semi-opaque in the light or dark tone nearest the
  background under them; each text takes black or white, whichever contrasts more with the pixels
  under its box (WCAG luminance), plus a thin outline in the other tone.
* **Fit.** The font size is the largest that fits the box after wrapping (words for scripts with
  spaces, characters for CJK).
* **Fonts.** CJK glyphs need a CJK font. One is searched for in common font folders and through
  ``fc-list``; without one, CJK text falls back to Pillow's built-in font, which draws empty boxes
  for CJK: a one-line warning says so (once per process) and the layout JSON records it.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .layout_refine import Placement, raw_layout, refine_layout
from .pipelines.request import LayoutElement

LOG = logging.getLogger("posterrt")
NO_CJK_FONT = ("no CJK font found: CJK text is drawn as empty boxes; install one "
               "(apt-get install fonts-wqy-zenhei, or fonts-noto-cjk)")
_warned: set[str] = set()

#: Searched in order; the first file that exists wins. Paths of Debian/Ubuntu, Fedora, Arch, macOS.
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
)
LATIN_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
    "/System/Library/Fonts/Helvetica.ttc",
)
MIN_FONT_PX = 6
UNDERLAY_ALPHA = 0.6  # opaque enough to quiet a busy background, light enough to show it


def is_cjk(text: str) -> bool:
    """True if the text holds CJK ideographs, kana or hangul (characters a Latin font lacks)."""
    return any(0x2E80 <= ord(ch) <= 0x9FFF or 0xAC00 <= ord(ch) <= 0xD7AF or 0xF900 <= ord(ch) <= 0xFAFF
               or 0xFF00 <= ord(ch) <= 0xFFEF or 0x20000 <= ord(ch) <= 0x2FA1F for ch in text)


@functools.lru_cache(maxsize=None)
def find_font(cjk: bool) -> str | None:
    """Path of a font for CJK (or Latin) text, or None: the caller then uses Pillow's built-in font."""
    for candidate in CJK_FONT_CANDIDATES if cjk else LATIN_FONT_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    if shutil.which("fc-list"):
        query = [":lang=zh", "file"] if cjk else [":lang=en:style=Bold", "file"]
        try:
            listing = subprocess.run(["fc-list", *query], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        files = sorted(line.split(":")[0].strip() for line in listing.splitlines() if line.strip())
        if files:
            return files[0]
    return None


def load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is not None:
        return ImageFont.truetype(path, size)
    # Pillow >= 10.1 ships a scalable built-in font (Latin only: CJK shows as boxes, see module doc)
    return ImageFont.load_default(size=size)


def wrap(text: str, font, max_width: float, draw: ImageDraw.ImageDraw, break_words: bool = True) -> list[str] | None:
    """Greedy line breaking between words (between characters for CJK, which has no spaces).

    A word wider than the box is broken between characters when ``break_words``; otherwise the
    text does not fit at this size and None is returned.
    """
    units = list(text) if is_cjk(text) else text.split(" ")
    joiner = "" if is_cjk(text) else " "
    lines, current = [], ""
    for unit in units:
        trial = unit if not current else current + joiner + unit
        if draw.textlength(trial, font=font) <= max_width:
            current = trial
            continue
        if current:
            lines.append(current)
        if draw.textlength(unit, font=font) <= max_width:
            current = unit
            continue
        if not break_words:
            return None
        current = ""
        for ch in unit:
            if current and draw.textlength(current + ch, font=font) > max_width:
                lines.append(current)
                current = ch
            else:
                current += ch
    if current:
        lines.append(current)
    return lines


def fit_text(text: str, box_size: tuple[float, float], font_path: str | None, draw: ImageDraw.ImageDraw):
    """A large font (and its wrapped lines) for which ``text`` fits ``(width, height)``, measured on
    the real glyph extents, outline included.

    Words stay whole if any size allows it (a headline broken mid-word reads badly even when its
    letters are larger); only a box too narrow for the longest word at the smallest size breaks
    words. Binary search on the pixel size, since the block mostly grows with the size; a
    different line break can make a slightly larger size fit again, so the sizes up to 25% above
    the search's answer are tried too.
    """
    width, height = box_size

    def attempt(size, break_words):
        font = load_font(font_path, size)
        lines = wrap(text, font, width - 2 * stroke_width(size), draw, break_words)
        if lines is None:
            return None
        left, top, right, bottom = text_block(lines, font, size, draw)
        return (font, lines, size) if right - left <= width and bottom - top <= height else None

    for break_words in (False, True):
        best = None
        low, high = MIN_FONT_PX, max(MIN_FONT_PX, int(height))
        while low <= high:
            size = (low + high) // 2
            fitted = attempt(size, break_words)
            if fitted:
                best, low = fitted, size + 1
            else:
                high = size - 1
        if best is not None:
            for size in range(best[2] + 2, min(int(height), int(best[2] * 1.25)) + 1):
                best = attempt(size, break_words) or best
            return best
    # the box is too small even for MIN_FONT_PX: draw at that size, clipped by the box
    font = load_font(font_path, MIN_FONT_PX)
    return font, wrap(text, font, width, draw), MIN_FONT_PX


def stroke_width(size: int) -> int:
    return max(1, size // 16)


def line_spacing(size: int) -> int:
    return max(1, int(size * 0.15))


def text_block(lines, font, size, draw) -> tuple[float, float, float, float]:
    """Bounding box of the centred multi-line block drawn at (0, 0), outline included."""
    return draw.multiline_textbbox((0, 0), "\n".join(lines), font=font, spacing=line_spacing(size), align="center",
                                   stroke_width=stroke_width(size))


def relative_luminance(rgb: np.ndarray) -> float:
    """WCAG 2 relative luminance of the mean colour of ``rgb`` (uint8, ...x3)."""
    rgb = np.asarray(rgb)[..., :3]  # an RGBA crop counts by its colour
    mean = rgb.reshape(-1, 3).mean(axis=0) / 255.0 if rgb.size else np.array([0.5, 0.5, 0.5])
    linear = np.where(mean <= 0.03928, mean / 12.92, ((mean + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(l1: float, l2: float) -> float:
    high, low = max(l1, l2), min(l1, l2)
    return (high + 0.05) / (low + 0.05)


def text_colour(region: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(fill, outline): black or white, whichever contrasts more with the region; outline the other."""
    luminance = relative_luminance(region)
    if contrast_ratio(luminance, 1.0) >= contrast_ratio(luminance, 0.0):
        return (255, 255, 255), (0, 0, 0)
    return (0, 0, 0), (255, 255, 255)


def _clip_box(box, width, height) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return x1, y1, x2, y2


def paint_underlay(canvas: Image.Image, box) -> None:
    """A rounded, semi-opaque panel in the light or dark tone nearest the background beneath it."""
    region = np.asarray(canvas.crop(box))
    tone = (255, 255, 255) if relative_luminance(region) > 0.18 else (0, 0, 0)  # 0.18: mid-grey's luminance
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    radius = max(2, min(box[2] - box[0], box[3] - box[1]) // 6)
    # Pillow rectangles include their right and bottom edges: stop one pixel short of x2, y2
    ImageDraw.Draw(overlay).rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=radius,
                                              fill=(*tone, int(255 * UNDERLAY_ALPHA)))
    canvas.alpha_composite(overlay)


def paste_logo(canvas: Image.Image, box, logo: np.ndarray) -> None:
    """The logo scaled to fit inside the box (aspect kept), centred, blended by its alpha."""
    image = Image.fromarray(logo, "RGBA")
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(width / image.width, height / image.height)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    offset = (box[0] + (width - image.width) // 2, box[1] + (height - image.height) // 2)
    canvas.alpha_composite(image, offset)


def draw_text(canvas: Image.Image, box, text: str) -> None:
    """Fit, colour and centre ``text`` in ``box``. Drawn on a layer the size of the box, so no
    glyph ever spills onto a neighbouring element."""
    width, height = box[2] - box[0], box[3] - box[1]
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font, lines, size = fit_text(text, (width, height), find_font(cjk=is_cjk(text)), draw)
    fill, outline = text_colour(np.asarray(canvas.crop(box)))
    left, top, right, bottom = text_block(lines, font, size, draw)
    origin = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    # centred: poster text is centred in its box far more often than not
    draw.multiline_text(origin, "\n".join(lines), font=font, fill=fill, spacing=line_spacing(size), align="center",
                        stroke_width=stroke_width(size), stroke_fill=outline)
    canvas.alpha_composite(layer, (box[0], box[1]))


def compose_poster(background: np.ndarray, elements: list[LayoutElement], logo: np.ndarray | None = None) -> np.ndarray:
    """Draw underlays, then the logo, then the texts already assigned to text boxes; RGB uint8 out."""
    height, width = background.shape[:2]
    canvas = Image.fromarray(background).convert("RGBA")
    boxes = [(e, _clip_box(e.box, width, height)) for e in elements]
    boxes = [(e, b) for e, b in boxes if b is not None]
    for element, box in boxes:
        if element.cls == "underlay":
            paint_underlay(canvas, box)
    if logo is not None:
        for element, box in boxes:
            if element.cls == "logo":
                paste_logo(canvas, box, logo)
    for element, box in boxes:
        if element.cls == "text" and element.text:
            draw_text(canvas, box, element.text)
    return np.asarray(canvas.convert("RGB"))


def font_warnings(elements: list[LayoutElement]) -> list[str]:
    """What the drawing of these texts will lack (a CJK font), logged once per process."""
    found = []
    if any(e.text and is_cjk(e.text) for e in elements) and find_font(cjk=True) is None:
        found.append(NO_CJK_FONT)
    for message in found:
        if message not in _warned:
            _warned.add(message)
            LOG.warning("warning: %s", message)
    return found


@dataclass
class Composition:
    image: np.ndarray  # RGB uint8 HxWx3, the poster
    placement: Placement  # drawn and proposed elements, unplaced texts
    warnings: list[str] = field(default_factory=list)


def compose(background: np.ndarray, proposals: list[LayoutElement], texts: list[str], logo: np.ndarray | None = None,
            product_mask: np.ndarray | None = None, refine: bool = True) -> Composition:
    """Place the layout's elements (refined, or as proposed) and draw them on ``background``.

    ``product_mask``: float HxW on the poster canvas, 1 = product (what refinement keeps clear)."""
    if refine:
        size = (background.shape[1], background.shape[0])
        placement = refine_layout(proposals, texts, size, product_mask, draw_logo=logo is not None)
    else:
        placement = raw_layout(proposals, texts, draw_logo=logo is not None)
    warnings = font_warnings(placement.elements)
    return Composition(compose_poster(background, placement.elements, logo), placement, warnings)
