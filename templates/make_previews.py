"""Regenerate the template preview cards, and the ID-photo init images and masks.

    .venv/bin/python templates/make_previews.py [--out DIR]

Reads the raw templates/*.json files and writes every file they name under `preview`,
`init_image` and `mask` (paths relative to the templates directory, or to --out).
Output is deterministic: same JSON + same font file -> byte-identical PNGs.

Preview cards are honest placeholders (gradient, names, category, gender), not photos.
Init images are a plain background of the ID photo colour with a neutral grey
head-and-shoulders shape; masks are white where the person is regenerated.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

TEMPLATES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TEMPLATES_DIR.parent))
from portraits.catalog import CATEGORIES  # noqa: E402  (the script runs from any directory)

FONT_PATH = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
PREVIEW_SIZE = (384, 512)

CATEGORY_COLOURS = {
    "ancient_costume": (176, 74, 60),
    "urban": (52, 70, 140),
    "id_photo": (70, 110, 150),
    "casual": (72, 150, 110),
    "business": (50, 60, 78),
    "wedding": (214, 150, 170),
    "campus": (60, 130, 190),
    "festive": (200, 40, 40),
    "sports": (235, 130, 40),
    "vintage": (140, 105, 70),
    "couple": (206, 84, 120),
    "family": (188, 120, 48),
}
# Standard Chinese ID photo backgrounds.
ID_BACKGROUND_RGB = {"white": (255, 255, 255), "blue": (67, 142, 219), "red": (255, 0, 0)}
NEUTRAL_PERSON_GREY = (128, 128, 128)
GENDER_LABELS = {"female": "♀ 女士 · Female", "male": "♂ 男士 · Male", "any": "多人 · Album"}


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    width, height = size
    column = Image.new("RGB", (1, height))
    for y in range(height):
        column.putpixel((0, y), _mix(top, bottom, y / max(1, height - 1)))
    return column.resize(size, Image.Resampling.NEAREST)


def _person_shape(size: tuple[int, int], margin: float = 0.0) -> Image.Image:
    """L-mode head-and-shoulders silhouette, 255 inside; `margin` grows it (fraction of width)."""
    width, height = size
    grow = margin * width
    shape = Image.new("L", size, 0)
    draw = ImageDraw.Draw(shape)
    cx = width / 2
    head_w, head_h = 0.36 * width, 0.34 * height
    head_top = 0.14 * height
    draw.ellipse((cx - head_w / 2 - grow, head_top - grow, cx + head_w / 2 + grow, head_top + head_h + grow), fill=255)
    neck_w = 0.16 * width
    draw.rectangle((cx - neck_w / 2 - grow, head_top + head_h * 0.8, cx + neck_w / 2 + grow, 0.62 * height), fill=255)
    shoulders_top = 0.60 * height
    draw.rounded_rectangle(
        (0.06 * width - grow, shoulders_top - grow, 0.94 * width + grow, height + 0.2 * height),
        radius=round(0.22 * width), fill=255,
    )
    return shape


def make_init_image(size: tuple[int, int], background: str) -> Image.Image:
    image = Image.new("RGB", size, ID_BACKGROUND_RGB[background])
    image.paste(Image.new("RGB", size, NEUTRAL_PERSON_GREY), (0, 0), _person_shape(size))
    return image


def make_mask(size: tuple[int, int]) -> Image.Image:
    # A little larger than the init silhouette so hair and collars can extend past it.
    return _person_shape(size, margin=0.04)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(FONT_PATH, size)


def _centered(draw: ImageDraw.ImageDraw, y: int, text: str, font: ImageFont.FreeTypeFont, fill) -> None:
    width = draw.textlength(text, font=font)
    draw.text(((PREVIEW_SIZE[0] - width) / 2, y), text, font=font, fill=fill)


def _fit_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: int) -> ImageFont.FreeTypeFont:
    font = _font(size)
    while size > 12 and draw.textlength(text, font=font) > max_width:
        size -= 2
        font = _font(size)
    return font


def make_preview(template: dict) -> Image.Image:
    category = template["category"]
    base = CATEGORY_COLOURS[category]
    card = _gradient(PREVIEW_SIZE, _mix(base, (255, 255, 255), 0.35), _mix(base, (0, 0, 0), 0.35))
    width, height = PREVIEW_SIZE

    # Pale silhouette (or the ID background colour) marks the portrait area without pretending to be a photo.
    area = (width // 2 - 110, 70, width // 2 + 110, 300)
    area_size = (area[2] - area[0], area[3] - area[1])
    if template.get("background") in ID_BACKGROUND_RGB:
        card.paste(make_init_image(area_size, template["background"]), area[:2])
    else:
        glow = Image.new("RGB", area_size, (255, 255, 255))
        alpha = _person_shape(area_size).point(lambda v: v * 70 // 255).filter(ImageFilter.GaussianBlur(2))
        card.paste(glow, area[:2], alpha)

    draw = ImageDraw.Draw(card)
    zh_cat, en_cat = CATEGORIES[category]["zh"], CATEGORIES[category]["en"]
    draw.rounded_rectangle((16, 16, 16 + 24 + draw.textlength(f"{zh_cat} · {en_cat}", font=_font(18)), 48),
                           radius=14, fill=_mix(base, (0, 0, 0), 0.5))
    draw.text((28, 19), f"{zh_cat} · {en_cat}", font=_font(18), fill=(255, 255, 255))

    _centered(draw, 318, template["name"]["zh"], _fit_font(draw, template["name"]["zh"], 44, width - 40), (255, 255, 255))
    _centered(draw, 376, template["name"]["en"], _fit_font(draw, template["name"]["en"], 24, width - 40), (240, 240, 240))
    _centered(draw, 420, GENDER_LABELS[template["gender"]], _font(22), (255, 255, 255))
    if template.get("output_size"):
        w, h = template["output_size"]
        _centered(draw, 452, f"{w}×{h} px", _font(18), (235, 235, 235))
    _centered(draw, height - 30, "模板示意图 · Template preview, not a photo", _font(14), (230, 230, 230))
    return card


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=9)


def generate(templates_dir: Path = TEMPLATES_DIR, out_dir: Path | None = None) -> list[Path]:
    """Write previews, init images and masks for every template; returns the paths written."""
    out_dir = out_dir or templates_dir
    written: dict[Path, None] = {}
    for json_path in sorted(templates_dir.glob("*.json")):
        template = json.loads(json_path.read_text(encoding="utf-8"))
        size = (template["width"], template["height"])
        targets = [(template["preview"], lambda t=template: make_preview(t))]
        if template.get("init_image"):
            targets.append((template["init_image"], lambda b=template["background"]: make_init_image(size, b)))
        if template.get("mask"):
            targets.append((template["mask"], lambda: make_mask(size)))
        for rel, build in targets:
            path = out_dir / rel
            if path not in written:
                _save(build(), path)
                written[path] = None
    return list(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the templates directory")
    args = parser.parse_args(argv)
    paths = generate(TEMPLATES_DIR, args.out)
    print(f"wrote {len(paths)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
