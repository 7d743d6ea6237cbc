"""AIGC visible and metadata labels."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from models.labels import (
    CJK_FONT_PACKAGE,
    PREVIEW_KIND,
    FontNotFoundError,
    find_cjk_font,
    label_image,
    png_info_for,
    read_label,
)

EXPECTED_METADATA = {
    "Label": "1",
    "ContentProducer": "妙相科技",
    "ProduceID": "img_0001",
    "ReservedCode1": "",
    "ContentPropagator": "妙相科技",
    "PropagateID": "img_0001",
    "ReservedCode2": "",
}
BACKGROUND = (120, 130, 140)


def _labelled(size, fmt="PNG"):
    data = label_image(Image.new("RGB", size, BACKGROUND), content_id="img_0001", provider="妙相科技", fmt=fmt)
    return data, Image.open(io.BytesIO(data)).convert("RGB")


def _corner(array, fraction=0.35):
    height, width = array.shape[:2]
    return array[int(height * (1 - fraction)):, int(width * (1 - fraction)):]


@pytest.mark.parametrize("size", [(295, 413), (512, 512), (1024, 768)])
def test_visible_label_is_text_on_a_plate_in_the_corner(size):
    _, image = _labelled(size)
    pixels = np.asarray(image).astype(np.int16)
    assert image.size == size

    changed = np.abs(pixels - np.array(BACKGROUND)).sum(axis=-1) > 30
    height, width = changed.shape
    rows, cols = np.nonzero(changed)
    assert rows.min() > height * 0.75 and cols.min() > width * 0.5, "label must sit in the bottom-right corner"
    assert not changed[: height // 2].any()

    gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    corner = _corner(gray)
    plate = corner < 90
    text = corner > 200
    assert plate.sum() > 0 and text.sum() > 0
    # "AI生成" renders as several separate glyph strokes, not a blob: a readable text region.
    component_count, _ = cv2.connectedComponents(text.astype(np.uint8))
    assert component_count - 1 >= 4
    text_rows = np.nonzero(text.any(axis=1))[0]
    assert text_rows.max() - text_rows.min() + 1 >= 0.05 * min(size)


@pytest.mark.parametrize("size", [(128, 128), (512, 512)])
def test_a_preview_says_so_in_both_labels_and_its_visible_mark_stays_in_the_corner(size):
    plain = np.asarray(_labelled(size)[1]).astype(np.int16)
    data = label_image(Image.new("RGB", size, BACKGROUND), content_id="img_0001", provider="妙相科技",
                       kind=PREVIEW_KIND)
    preview = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    marked = [np.abs(pixels - np.array(BACKGROUND)).sum(axis=-1) > 30 for pixels in (plain, preview)]
    widths = [np.ptp(np.nonzero(mark)[1]) for mark in marked]
    assert widths[1] > widths[0] * 1.4  # "AI生成·预览": more glyphs on the plate than "AI生成"
    rows, cols = np.nonzero(marked[1])
    assert rows.min() > size[1] * 0.7 and cols.max() < size[0] and not marked[1][: size[1] // 2].any()
    assert read_label(data) == {**EXPECTED_METADATA, "Kind": PREVIEW_KIND}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_metadata_label_round_trips(fmt):
    data, _ = _labelled((295, 413), fmt=fmt)
    assert Image.open(io.BytesIO(data)).format == fmt
    assert read_label(data) == EXPECTED_METADATA


def test_png_label_is_an_itxt_chunk_named_aigc():
    data, _ = _labelled((64, 64))
    assert b"iTXtAIGC" in data


def test_jpeg_label_is_in_exif_description_and_user_comment():
    data, _ = _labelled((64, 64), fmt="JPEG")
    exif = Image.open(io.BytesIO(data)).getexif()
    assert '"ProduceID": "img_0001"' in exif[0x010E]
    assert exif.get_ifd(0x8769)[0x9286].startswith(b"ASCII\x00\x00\x00{")


def test_jpeg_label_is_an_xmp_packet_read_on_its_own():
    data, _ = _labelled((64, 64), fmt="JPEG")
    opened = Image.open(io.BytesIO(data))
    packet = opened.info["xmp"]
    assert b'xmlns:TC260="http://www.tc260.org.cn/ns/AIGC/1.0/"' in packet and b"<TC260:AIGC>{" in packet
    xmp_only = io.BytesIO()
    opened.save(xmp_only, format="JPEG", xmp=packet)  # no EXIF: the label is read from the XMP alone
    assert not Image.open(io.BytesIO(xmp_only.getvalue())).getexif()
    assert read_label(xmp_only.getvalue()) == EXPECTED_METADATA


def test_pillow_resave_keeps_png_label_only_with_pnginfo():
    data, _ = _labelled((64, 64))
    opened = Image.open(io.BytesIO(data))

    kept = io.BytesIO()
    opened.save(kept, format="PNG", pnginfo=png_info_for(opened))
    assert read_label(kept.getvalue()) == EXPECTED_METADATA

    dropped = io.BytesIO()
    opened.save(dropped, format="PNG")
    assert read_label(dropped.getvalue()) is None


def test_unlabelled_or_garbage_input_reads_as_none():
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    assert read_label(plain.getvalue()) is None
    assert read_label(b"not an image") is None


def test_unsupported_format_is_refused():
    with pytest.raises(ValueError):
        label_image(Image.new("RGB", (8, 8)), content_id="x", provider="p", fmt="GIF")


def test_font_lookup():
    assert find_cjk_font().endswith((".ttc", ".ttf", ".otf"))
    with pytest.raises(FontNotFoundError):
        find_cjk_font("/nonexistent/font.ttc")


def test_missing_font_error_names_the_debian_package(monkeypatch):
    monkeypatch.setattr("models.labels.KNOWN_CJK_FONTS", ("/nonexistent/a.ttc",))
    with pytest.raises(FontNotFoundError, match=CJK_FONT_PACKAGE):
        find_cjk_font()
