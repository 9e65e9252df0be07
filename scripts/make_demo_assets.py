"""Draws the product cutout and logo that ``posterrt demo`` uses (run once; the PNGs are committed).

    python scripts/make_demo_assets.py

Kept outside the package: the wheel ships the PNGs, not the script that drew them.

The product is a juice bottle on a transparent background (the alpha channel is the cutout mask),
placed right of centre so the layout has free space for texts. Drawn, not photographed: the
project ships no third-party image.
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parents[1] / "runtime" / "assets"
SIZE = 512


def bottle() -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 290, 430, 150, 470
    # body: orange glass with a vertical light-to-dark gradient, drawn column by column
    body = Image.new("RGBA", (right - left, bottom - top))
    for x in range(body.width):
        shade = 1.0 - 0.45 * abs(x / body.width - 0.35)
        ImageDraw.Draw(body).line([(x, 0), (x, body.height)], fill=(int(245 * shade), int(140 * shade), int(30 * shade), 255))
    rounded = Image.new("L", body.size, 0)
    ImageDraw.Draw(rounded).rounded_rectangle((0, 0, body.width - 1, body.height - 1), radius=28, fill=255)
    image.paste(body, (left, top), rounded)
    # shoulders and neck
    draw.polygon([(left + 10, top + 8), (right - 10, top + 8), (right - 45, top - 40), (left + 45, top - 40)],
                 fill=(230, 125, 25, 255))
    draw.rectangle((left + 45, top - 75, right - 45, top - 38), fill=(235, 135, 30, 255))
    # cap
    draw.rounded_rectangle((left + 40, top - 105, right - 40, top - 72), radius=6, fill=(40, 120, 60, 255))
    for x in range(left + 46, right - 40, 7):
        draw.line([(x, top - 103), (x, top - 74)], fill=(25, 90, 45, 255), width=2)
    # label with a leaf
    draw.rounded_rectangle((left + 8, top + 90, right - 8, top + 220), radius=10, fill=(250, 245, 225, 255))
    draw.ellipse((left + 45, top + 115, right - 45, top + 195), fill=(60, 150, 70, 255))
    draw.line([(left + 50, top + 190), (right - 50, top + 120)], fill=(250, 245, 225, 255), width=4)
    # highlight on the glass
    highlight = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(highlight).rounded_rectangle((left + 18, top + 20, left + 34, bottom - 30), radius=8,
                                                fill=(255, 255, 255, 110))
    image.alpha_composite(highlight.filter(ImageFilter.GaussianBlur(3)))
    return image


def logo() -> Image.Image:
    image = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 124, 124), fill=(200, 30, 40, 255))
    draw.ellipse((24, 24, 104, 104), fill=(255, 255, 255, 255))
    draw.polygon([(64, 34), (94, 94), (34, 94)], fill=(200, 30, 40, 255))
    return image


if __name__ == "__main__":
    bottle().save(HERE / "product.png", optimize=True)
    logo().save(HERE / "logo.png", optimize=True)
    for name in ("product.png", "logo.png"):
        print(HERE / name, (HERE / name).stat().st_size, "bytes")
