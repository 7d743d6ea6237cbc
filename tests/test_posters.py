import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from models import posters
from models.posters import make_poster, wrap_text
from tests.qr_support import decode_qr

FONT_PATH = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
PORTRAIT_COLOUR = (40, 120, 90)

pytestmark = pytest.mark.skipif(not Path(FONT_PATH).exists(), reason="needs fonts-wqy-microhei")


def _portrait(size=(512, 768)) -> Image.Image:
    image = Image.new("RGB", size, PORTRAIT_COLOUR)
    ImageDraw.Draw(image).ellipse((150, 150, 360, 420), fill=(220, 180, 160))
    return image


def _poster(**overrides) -> Image.Image:
    return Image.open(io.BytesIO(_poster_bytes(**overrides))).convert("RGB")


def _poster_bytes(**overrides) -> bytes:
    arguments = dict(caption_zh="穿越千年，花间一梦", app_code_png=_app_code_png(), font_path=FONT_PATH)
    arguments.update(overrides)
    portrait = arguments.pop("portrait", _portrait())
    return make_poster(portrait, **arguments)


def _app_code_png() -> bytes:
    """A stand-in for WeChat's mini-program code: four solid quadrants of distinctive colours."""
    image = Image.new("RGB", (430, 430))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 214, 214), fill=(255, 0, 255))
    draw.rectangle((215, 0, 429, 214), fill=(0, 200, 255))
    draw.rectangle((0, 215, 214, 429), fill=(255, 200, 0))
    draw.rectangle((215, 215, 429, 429), fill=(0, 160, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _region(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(box)).astype(int)


def test_poster_is_a_750x1334_png():
    data = _poster_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (750, 1334)


def test_poster_is_deterministic():
    assert _poster_bytes() == _poster_bytes()


@pytest.mark.parametrize(
    "broken",
    [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, _app_code_png()[:60]],
    ids=["empty", "text", "png_signature_only", "truncated_png"],
)
def test_no_poster_without_a_readable_mini_program_code(broken):
    """Moments refuses QR codes: without WeChat's code there is no poster, and no QR code in its place."""
    with pytest.raises(posters.UnreadableAppCode):
        _poster_bytes(app_code_png=broken)


def test_posters_draw_no_qr_code_of_their_own():
    assert not hasattr(posters, "qrcode") and not hasattr(posters, "_qr_code")
    assert decode_qr(_poster()) == ""


def test_app_code_pixels_appear_bottom_right():
    poster = _poster(app_code_png=_app_code_png())
    left, top, right, bottom = posters.CODE_BOX
    assert left >= 750 / 2 and top >= 1334 / 2, "the code sits bottom-right"
    size = right - left
    quarter = size // 4
    expected = {
        (left + quarter, top + quarter): (255, 0, 255),
        (right - quarter, top + quarter): (0, 200, 255),
        (left + quarter, bottom - quarter): (255, 200, 0),
        (right - quarter, bottom - quarter): (0, 160, 0),
    }
    for point, colour in expected.items():
        assert max(abs(a - b) for a, b in zip(poster.getpixel(point), colour)) <= 3, (point, poster.getpixel(point))
    assert decode_qr(poster.crop(posters.CODE_BOX)) == ""


def test_transparent_app_code_is_flattened_on_white():
    image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((20, 20, 180, 180), fill=(0, 128, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    poster = _poster(app_code_png=buffer.getvalue())
    left, top, right, bottom = posters.CODE_BOX
    assert poster.getpixel((left + 2, top + 2)) == (255, 255, 255)
    centre = poster.getpixel(((left + right) // 2, (top + bottom) // 2))
    assert max(abs(a - b) for a, b in zip(centre, (0, 128, 0))) <= 3


def test_code_hint_text_is_drawn_under_the_code():
    with_hint = _poster()
    left, _top, right, bottom = posters.CODE_BOX
    hint_area = _region(with_hint, (left - 20, bottom + 5, right + 20, bottom + 50))
    background = np.array(posters.BACKGROUND)
    assert (np.abs(hint_area - background).sum(axis=2) > 150).sum() > 100


def test_caption_pixels_differ_from_background():
    box = posters.CAPTION_BOX
    captioned = _region(_poster(caption_zh="穿越千年，花间一梦"), box)
    background = np.array(posters.BACKGROUND)
    dark = (np.abs(captioned - background).sum(axis=2) > 200).sum()
    assert dark > 500
    other_caption = _region(_poster(caption_zh="新年快乐"), box)
    assert not np.array_equal(captioned, other_caption)


def test_long_caption_wraps_inside_the_caption_box():
    long_caption = "愿你走出半生，归来仍是少年。" * 6
    poster = _poster(caption_zh=long_caption)
    box = posters.CAPTION_BOX
    background = np.array(posters.BACKGROUND)
    caption = _region(poster, box)
    rows_with_ink = np.where((np.abs(caption - background).sum(axis=2) > 200).any(axis=1))[0]
    assert rows_with_ink.max() - rows_with_ink.min() > 2 * posters.CAPTION_FONT_SIZE, "several lines"
    # Nothing spills between the caption box and the code.
    gutter = _region(poster, (box[2] + 2, box[1], posters.CODE_BOX[0] - 2, box[3]))
    assert (np.abs(gutter - background).sum(axis=2) == 0).all()


def test_wrap_text_breaks_cjk_keeps_words_and_ellipsizes():
    font = ImageFont.truetype(FONT_PATH, 36)
    lines = wrap_text("愿你走出半生，归来仍是少年。" * 6, font, 430, 4)
    assert len(lines) == 4
    assert lines[-1].endswith("…")
    assert all(font.getlength(line) <= 430 + font.getlength("，") for line in lines)
    assert not any(line[0] in "，。" for line in lines)
    words = wrap_text("hello wonderful world of portraits", font, 200, 10)
    assert all(not line.startswith(" ") for line in words)
    assert "wonderful" in " ".join(words).split()
    assert wrap_text("短句", font, 430, 4) == ["短句"]


def test_ai_label_is_visible_on_the_portrait():
    poster = _poster()
    left, top, right, bottom = posters.PORTRAIT_BOX
    portrait_w = round((bottom - top) * 512 / 768)  # the 512x768 portrait is height-bound
    x0 = left + ((right - left) - portrait_w) // 2
    label_area = _region(poster, (x0, bottom - 90, x0 + 160, bottom))
    unlabelled = np.full(label_area.shape, PORTRAIT_COLOUR)  # this corner of the portrait is plain
    white = (label_area.min(axis=2) > 230).sum()
    darkened = (label_area.sum(axis=2) < unlabelled.sum(axis=2) - 100).sum()
    assert white > 100, "white label text"
    assert darkened > 1000, "dark badge behind the text"


def test_portrait_fills_the_top_area_and_keeps_its_aspect():
    wide = Image.new("RGB", (1200, 600), PORTRAIT_COLOUR)
    poster = _poster(portrait=wide)
    left, top, right, bottom = posters.PORTRAIT_BOX
    mask = (np.abs(_region(poster, (0, 0, 750, bottom + 10)) - np.array(PORTRAIT_COLOUR)).sum(axis=2) <= 3)
    ys, xs = np.where(mask)
    assert xs.min() == left and xs.max() == right - 1, "fits the width"
    assert abs((ys.max() - ys.min() + 1) - (right - left) / 2) <= 2, "2:1 aspect kept"
    assert ys.max() < bottom


def test_a_blank_label_is_refused():
    with pytest.raises(ValueError):
        _poster_bytes(label_text="  ")


def test_png_text_chunks_carry_metadata():
    data = _poster_bytes(png_text={"AIGC": '{"provider":"demo","content_id":"c1"}'})
    with Image.open(io.BytesIO(data)) as image:
        assert image.text["AIGC"] == '{"provider":"demo","content_id":"c1"}'


def test_rgba_and_palette_portraits_are_accepted():
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 128))
    palette = _portrait().convert("P")
    for portrait in (rgba, palette, _portrait().convert("L")):
        with Image.open(io.BytesIO(_poster_bytes(portrait=portrait))) as image:
            assert image.size == (750, 1334)


def test_an_already_labelled_portrait_gets_no_second_badge():
    poster = _poster(portrait_labelled=True)
    left, top, right, bottom = posters.PORTRAIT_BOX
    portrait_w = round((bottom - top) * 512 / 768)
    x0 = left + ((right - left) - portrait_w) // 2
    label_area = _region(poster, (x0, bottom - 90, x0 + 160, bottom))
    assert (np.abs(label_area - np.array(PORTRAIT_COLOUR)).sum(axis=2) > 6).sum() == 0, "plain portrait corner"
    # The poster is otherwise the same poster, its code in place.
    assert poster.crop(posters.CODE_BOX).getpixel((10, 10)) == (255, 0, 255)
    with pytest.raises(ValueError):
        _poster_bytes(label_text=" ")
    _poster_bytes(label_text=" ", portrait_labelled=True)
