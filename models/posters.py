"""Share posters: the labelled portrait, a caption and WeChat's mini-program code back into the app.

Moments does not allow QR codes on shared images, so a poster is only ever made with the mini-program code WeChat
drew (getwxacodeunlimit); there is no QR fallback (portraits.sharing owes the code while WeChat cannot make it)."""
from __future__ import annotations

import io
import re
from typing import Mapping

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

POSTER_SIZE = (750, 1334)
BACKGROUND = (250, 247, 242)
PORTRAIT_BOX = (40, 40, 710, 960)          # left, top, right, bottom of the portrait area
PORTRAIT_MAT = (232, 228, 222)
CAPTION_BOX = (40, 1000, 470, 1230)
CAPTION_COLOUR = (34, 34, 34)
CAPTION_FONT_SIZE = 36
CAPTION_MAX_LINES = 4
CODE_BOX = (500, 1000, 710, 1210)          # square, bottom-right
CODE_HINT = "长按识别小程序码"
HINT_COLOUR = (110, 110, 110)
FOOTER_TEXT = "本图片由AI生成"
LABEL_FONT_SIZE = 30
LABEL_MARGIN = 16
LABEL_PADDING = (14, 8)

# Characters that must not begin a line in Chinese typesetting (kinsoku).
_NO_LINE_START = set("，。、；：！？）》」』”’,.;:!?)…")
_TOKEN = re.compile(r"[A-Za-z0-9'’\-]+|\s+|.", re.DOTALL)


class UnreadableAppCode(ValueError):
    """The bytes given as the mini-program code are not an image."""


def make_poster(
    portrait: Image.Image,
    *,
    caption_zh: str,
    app_code_png: bytes,
    font_path: str,
    label_text: str = "AI生成",
    portrait_labelled: bool = False,
    png_text: Mapping[str, str] | None = None,
) -> bytes:
    """Render a 750x1334 PNG poster and return its bytes.

    app_code_png is the mini-program code image from WeChat (PNG or JPEG); anything that does
    not decode raises UnreadableAppCode, never a poster without it. png_text, if given, is
    written as PNG text chunks (e.g. the AIGC metadata label). A blank label_text is refused:
    every generated image must carry a visible label. portrait_labelled says the portrait
    already carries its visible label (as every stored image does); the poster then adds no
    second badge, and the portrait's own label is only ever scaled, never cropped.
    """
    if not portrait_labelled and not label_text.strip():
        raise ValueError("label_text must not be blank")
    poster = Image.new("RGB", POSTER_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(poster)

    portrait_rect = _paste_portrait(poster, portrait)
    if not portrait_labelled:
        _draw_label(poster, portrait_rect, label_text, ImageFont.truetype(font_path, LABEL_FONT_SIZE))

    caption_font = ImageFont.truetype(font_path, CAPTION_FONT_SIZE)
    line_height = round(CAPTION_FONT_SIZE * 1.45)
    max_lines = min(CAPTION_MAX_LINES, (CAPTION_BOX[3] - CAPTION_BOX[1]) // line_height)
    lines = wrap_text(caption_zh, caption_font, CAPTION_BOX[2] - CAPTION_BOX[0], max_lines)
    for index, line in enumerate(lines):
        draw.text((CAPTION_BOX[0], CAPTION_BOX[1] + index * line_height), line, font=caption_font, fill=CAPTION_COLOUR)

    code = read_app_code(app_code_png)
    code_size = (CODE_BOX[2] - CODE_BOX[0], CODE_BOX[3] - CODE_BOX[1])
    if code.size != code_size:
        code = code.resize(code_size, Image.Resampling.LANCZOS)
    poster.paste(code, CODE_BOX[:2])

    hint_font = ImageFont.truetype(font_path, 22)
    hint_width = draw.textlength(CODE_HINT, font=hint_font)
    code_centre = (CODE_BOX[0] + CODE_BOX[2]) / 2
    draw.text((code_centre - hint_width / 2, CODE_BOX[3] + 14), CODE_HINT, font=hint_font, fill=HINT_COLOUR)

    footer_font = ImageFont.truetype(font_path, 20)
    draw.text((CAPTION_BOX[0], POSTER_SIZE[1] - 60), FOOTER_TEXT, font=footer_font, fill=HINT_COLOUR)

    return _png_bytes(poster, png_text)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float, max_lines: int) -> list[str]:
    """Greedy wrap: CJK breaks between any characters, Latin words stay whole when they fit."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(_wrap_paragraph(paragraph, font, max_width))
    lines = [line for line in lines if line] or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _with_ellipsis(lines[-1], font, max_width)
    return lines


def _wrap_paragraph(paragraph: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    lines: list[str] = []
    current = ""
    for token in _TOKEN.findall(paragraph.strip()):
        candidate = current + token
        if font.getlength(candidate) <= max_width or not current:
            current = candidate
        elif token.isspace():
            lines.append(current.rstrip())
            current = ""
        elif token[0] in _NO_LINE_START:
            # Keep closing punctuation on the previous line even if it slightly overhangs.
            lines.append(candidate)
            current = ""
        else:
            lines.append(current.rstrip())
            current = token
        while font.getlength(current) > max_width and len(current) > 1:
            # A single token (a long Latin word) wider than the line: split it by characters.
            cut = len(current)
            while cut > 1 and font.getlength(current[:cut]) > max_width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current.strip():
        lines.append(current.rstrip())
    return lines


def _with_ellipsis(line: str, font: ImageFont.FreeTypeFont, max_width: float) -> str:
    while line and font.getlength(line + "…") > max_width:
        line = line[:-1]
    return line.rstrip() + "…"


def _flatten(image: Image.Image) -> Image.Image:
    image = image.convert("RGBA") if image.mode in ("P", "PA", "LA", "RGBA") else image.convert("RGB")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, (0, 0), image)
        return flat
    return image


def _paste_portrait(poster: Image.Image, portrait: Image.Image) -> tuple[int, int, int, int]:
    left, top, right, bottom = PORTRAIT_BOX
    box_w, box_h = right - left, bottom - top
    ImageDraw.Draw(poster).rectangle((left, top, right - 1, bottom - 1), fill=PORTRAIT_MAT)
    image = _flatten(portrait)
    scale = min(box_w / image.width, box_h / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    x, y = left + (box_w - size[0]) // 2, top + (box_h - size[1]) // 2
    poster.paste(image, (x, y))
    return (x, y, x + size[0], y + size[1])


def _draw_label(poster: Image.Image, rect: tuple[int, int, int, int], text: str, font: ImageFont.FreeTypeFont) -> None:
    """Dark translucent badge with white text in the portrait's bottom-left corner: legible on any image."""
    text_box = font.getbbox(text)
    pad_x, pad_y = LABEL_PADDING
    badge_w = (text_box[2] - text_box[0]) + 2 * pad_x
    badge_h = (text_box[3] - text_box[1]) + 2 * pad_y
    x0 = rect[0] + LABEL_MARGIN
    y0 = rect[3] - LABEL_MARGIN - badge_h
    overlay = Image.new("RGBA", poster.size, (0, 0, 0, 0))
    overlay_draw = ImageDraw.Draw(overlay)
    overlay_draw.rounded_rectangle((x0, y0, x0 + badge_w, y0 + badge_h), radius=badge_h // 3, fill=(0, 0, 0, 160))
    overlay_draw.text((x0 + pad_x - text_box[0], y0 + pad_y - text_box[1]), text, font=font, fill=(255, 255, 255, 255))
    poster.paste(Image.alpha_composite(poster.convert("RGBA"), overlay).convert("RGB"))


def read_app_code(data: bytes) -> Image.Image:
    """The mini-program code as an RGB image (transparency flattened on white); UnreadableAppCode otherwise."""
    if not data:
        raise UnreadableAppCode("no mini-program code")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _flatten(image)
    # PIL signals undecodable input through several exception types; any of them means "not an image".
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise UnreadableAppCode(f"the mini-program code does not decode: {type(error).__name__}") from error


def _png_bytes(image: Image.Image, png_text: Mapping[str, str] | None) -> bytes:
    info = None
    if png_text:
        info = PngImagePlugin.PngInfo()
        for key, value in png_text.items():
            info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
