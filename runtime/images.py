"""User inputs that are files or strings: images, masks, text lines. Loaded and checked here, once,
so the pipelines only ever see valid arrays (RGB uint8 HxWx3, masks float32 HxW in 0..1).
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .contracts import DYNAMIC_DIMS
from .errors import InputError

#: Largest image we decode: 4096 x 4096 = 16.7 MP (a 64 MB RGBA buffer). Bigger files are refused
#: before decoding, so a hostile or mistaken file cannot exhaust memory.
MAX_IMAGE_PIXELS = 4096 * 4096
#: At most one text line per RADM `lines` slot (the contract's dynamic range).
MAX_TEXT_LINES = DYNAMIC_DIMS["lines"].max
#: Longer lines could not be fitted legibly into any box of a 1024-pixel poster.
MAX_TEXT_CHARS = 200
#: A mask pixel (or alpha) above this counts as product.
MASK_THRESHOLD = 0.5
#: Pillow modes with 8 bits per channel, whose conversion to RGB keeps the picture. 16-bit and
#: float modes ("I;16", "I", "F": depth maps, scientific TIFFs) would be clipped to white by
#: ``convert("RGB")``; they are refused rather than turned silently into a blank product.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def open_image(path: str | os.PathLike, field: str) -> Image.Image:
    """Decode an image file after checking it exists, is one still 8-bit image and is within
    MAX_IMAGE_PIXELS. Every refusal names the field, the file and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{field}: {str(path)!r} is a folder, expected an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise InputError(f"{field}: file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"{field}: {str(path)!r} is empty (0 bytes); expected a PNG, JPEG or other image file")
    try:
        image = Image.open(path)  # lazy: reads the header only, so the size is known before decoding
    except Image.DecompressionBombError:
        raise InputError(f"{field}: {str(path)!r} is larger than {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"{field}: {str(path)!r} is not an image Pillow can read ({type(error).__name__})") from None
    width, height = image.size
    if width * height == 0:  # Pillow refuses most such headers itself; a plugin that does not is caught here
        image.close()
        raise InputError(f"{field}: {str(path)!r} is {width}x{height} pixels; expected a non-empty image")
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise InputError(f"{field}: {str(path)!r} is {width}x{height} = {width * height} pixels, over the limit "
                         f"of {MAX_IMAGE_PIXELS} (4096x4096); downscale it first")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:  # GIF / APNG / WebP animations: which frame is the product would be a guess
        image.close()
        raise InputError(f"{field}: {str(path)!r} is animated ({frames} frames); expected a still image "
                         f"(export the frame you want as PNG)")
    if image.mode not in EIGHT_BIT_MODES:
        image.close()
        raise InputError(f"{field}: {str(path)!r} has pixel mode {image.mode!r} (16-bit or float); expected an "
                         f"8-bit RGB, RGBA, greyscale or palette image")
    try:
        image.load()
        # Phone photos store their orientation in EXIF: apply it so the pixels are upright.
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # SyntaxError: Pillow's plugins report some malformed headers/EXIF blocks with it
        raise InputError(f"{field}: {str(path)!r} is truncated or corrupt ({error})") from None


def load_rgb(path, field: str) -> np.ndarray:
    """RGB uint8 HxWx3 (alpha dropped)."""
    return np.asarray(open_image(path, field).convert("RGB"))


def load_rgba(path, field: str) -> np.ndarray:
    """RGBA uint8 HxWx4 (opaque alpha added when the file has none)."""
    return np.asarray(open_image(path, field).convert("RGBA"))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_product(path, mask_path=None, require_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The product image as RGB uint8 HxWx3 and its cutout mask float32 HxW (1 = product, 0 = free).

    The cutout comes from ``mask_path`` when given (grey levels, white = product), else from the
    image's alpha channel. ``require_mask``: pipelines that paint around the product need one.
    """
    image = open_image(path, "--product")
    rgb = np.asarray(image.convert("RGB"))
    if mask_path is not None:
        mask_image = open_image(mask_path, "--mask")
        if mask_image.size != image.size:
            raise InputError(f"--mask: {str(mask_path)!r} is {mask_image.size[0]}x{mask_image.size[1]}, expected the "
                             f"product image's size {image.size[0]}x{image.size[1]}")
        mask = np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0
        field, source, empty, full = "--mask", repr(str(mask_path)), "all black", "all white"
    elif has_alpha(image):
        mask = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        field, source, empty, full = "--product", f"the alpha channel of {str(path)!r}", "fully transparent", "fully opaque"
    else:
        if require_mask:
            raise InputError(f"--product: {str(path)!r} has no alpha channel and no --mask was given; this pipeline "
                             f"needs the product cutout (a PNG with transparency, or --mask MASK)")
        return rgb, None
    product_pixels = float((mask > MASK_THRESHOLD).mean())
    if require_mask and product_pixels == 0.0:
        raise InputError(f"{field}: {source} marks no product pixel ({empty}); expected the product "
                         f"{'in white' if field == '--mask' else 'opaque on a transparent background'}")
    if require_mask and product_pixels == 1.0:
        raise InputError(f"{field}: {source} marks every pixel as product ({full}); expected a cutout with free "
                         f"background around the product")
    return rgb, mask


def fit_to_canvas(rgb: np.ndarray, mask: np.ndarray | None, size: tuple[int, int],
                  fill: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale the product image to fit inside a ``(width, height)`` canvas, aspect kept, centred.

    The margins are ``fill`` and count as free background (mask 0) so generators paint there.
    """
    width, height = size
    src_h, src_w = rgb.shape[:2]
    scale = min(width / src_w, height / src_h)
    new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.LANCZOS), (left, top))
    if mask is None:
        return np.asarray(canvas), None
    mask_canvas = Image.new("L", (width, height), 0)
    mask_image = Image.fromarray(np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8))
    mask_canvas.paste(mask_image.resize((new_w, new_h), Image.Resampling.BILINEAR), (left, top))
    return np.asarray(canvas), np.asarray(mask_canvas, dtype=np.float32) / 255.0


def flatten(rgb: np.ndarray, mask: np.ndarray | None, fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The cutout over a flat ``fill``: what a transparent PNG looks like in a viewer. Transparent
    pixels often hold arbitrary (often black) RGB, which must not reach a model as content."""
    if mask is None:
        return rgb
    alpha = mask[..., None]
    return np.round(alpha * rgb + (1.0 - alpha) * np.asarray(fill, dtype=np.float32)).astype(np.uint8)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to ``(width, height)`` (aspect not kept: encoders take square inputs)."""
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel x1y1x2y2 (x2, y2 exclusive) bounding the product pixels; None if there are none."""
    ys, xs = np.nonzero(mask > MASK_THRESHOLD)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _control_character(text: str) -> tuple[int, str] | None:
    """(position, character) of the first character no poster can show: C0/C1 controls (NUL,
    ESC, BEL, ...) and lone surrogates (which cannot even be written as UTF-8)."""
    for position, character in enumerate(text):
        if unicodedata.category(character) in ("Cc", "Cs"):
            return position, character
    return None


def check_texts(texts) -> list[str]:
    """Poster text lines: at most MAX_TEXT_LINES, none empty, none over MAX_TEXT_CHARS characters,
    no control characters. Any script (and any mix of scripts) is accepted: the tokenizers are
    byte-level and the composer picks a font per line."""
    if isinstance(texts, (str, bytes)):  # list("Sale") would silently make four one-letter lines
        raise InputError(f"texts: got the string {texts!r}, expected a list of text lines such as [{texts!r}]")
    texts = list(texts or [])
    if len(texts) > MAX_TEXT_LINES:
        raise InputError(f"--text: got {len(texts)} lines, at most {MAX_TEXT_LINES} fit a poster (the layout "
                         f"model's line limit)")
    cleaned = []
    for index, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"--text: line {index} is empty ({text!r}); expected visible text")
        # Unicode NFC: the same words typed on two keyboards give the same tokens and glyphs.
        # Then whitespace runs and newlines become one space: the composer wraps by itself.
        text = " ".join(unicodedata.normalize("NFC", text).split())
        found = _control_character(text)
        if found is not None:
            position, character = found
            kind = "a lone surrogate" if unicodedata.category(character) == "Cs" else "a control character"
            raise InputError(f"--text: line {index} holds U+{ord(character):04X}, {kind}, at position "
                             f"{position + 1}; expected printable text")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"--text: line {index} has {len(text)} characters, at most {MAX_TEXT_CHARS} fit a box")
        cleaned.append(text)
    return cleaned


#: Category names are a word or two ("running shoes"); the prompt template has room for little more.
MAX_CATEGORY_CHARS = 60


def check_category(category) -> str:
    """The product category that goes into the background prompt: visible, short, printable."""
    if not isinstance(category, str) or not category.strip():
        raise InputError(f"--category: got {category!r}, expected a category name such as 'shoes'")
    category = " ".join(unicodedata.normalize("NFC", category).split())
    found = _control_character(category)
    if found is not None:
        raise InputError(f"--category: holds U+{ord(found[1]):04X} at position {found[0] + 1}; expected printable text")
    if len(category) > MAX_CATEGORY_CHARS:
        raise InputError(f"--category: has {len(category)} characters, at most {MAX_CATEGORY_CHARS} (a category "
                         f"name such as 'running shoes')")
    return category


def check_out_folder(path: Path, field: str = "--out") -> Path:
    """An output path whose folder exists, or is one new folder in an existing one (``out/poster.png``
    creates ``out``). A deeper missing tree is refused: it is more often a typo than a wish."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{field}: {str(folder)!r} is a file, expected a folder for {path.name!r}")
    if not folder.exists() and not folder.parent.is_dir():
        raise InputError(f"{field}: folder {str(folder.parent)!r} does not exist; create it first (posterrt creates "
                         f"at most the last folder of {str(path)!r})")
    return path


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    path = check_out_folder(Path(path))
    if path.suffix.lower() != ".png":
        raise InputError(f"--out: {str(path)!r} must end in .png (posters are written as PNG)")
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(rgb).save(path, format="PNG")
    return path
