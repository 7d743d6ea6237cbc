"""AIGC labels for generated images (AIGC labeling measures, GB 45438-2025).

Two labels per image:
- visible ("explicit"): "AI生成" in the bottom-right corner, white on a semi-opaque dark plate; text height is 6% of
  the shorter side (the standard asks for at least 5%), never below 14 px, so it stays legible from an ID-photo
  295x413 up to 1024 px.
- metadata ("implicit"): JSON with the standard's fields under the key "AIGC" — a PNG iTXt chunk, or for JPEG an
  XMP packet (property ``TC260:AIGC`` in the namespace ``XMP_NAMESPACE``) and, for readers that know only EXIF, EXIF
  ImageDescription (IFD0) and EXIF UserComment (Exif IFD). ``read_label`` reads any of them.

Re-saving: Pillow does not copy PNG text chunks on its own; ``Image.save`` keeps the label only when given
``pnginfo`` (see ``png_info_for``). EXIF in a JPEG is likewise kept only when ``exif=`` is passed on save.
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ElementTree
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

LABEL_TEXT = "AI生成"
# A preview (drawn before the user's avatar is trained) says so in both labels.
PREVIEW_LABEL_TEXT = "AI生成·预览"
PREVIEW_KIND = "preview"
METADATA_KEY = "AIGC"
CJK_FONT_PACKAGE = "fonts-wqy-microhei"
KNOWN_CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)
TEXT_HEIGHT_RATIO = 0.06
MIN_TEXT_PX = 14
PLATE_OPACITY = 150  # of 255
JPEG_QUALITY = 92

EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_ASCII_PREFIX = b"ASCII\x00\x00\x00"
XMP_NAMESPACE = "http://www.tc260.org.cn/ns/AIGC/1.0/"
XMP_PREFIX = "TC260"
XMP_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:{prefix}="{namespace}"><{prefix}:{key}>{value}</{prefix}:{key}>'
    '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)


class FontNotFoundError(FileNotFoundError):
    pass


def find_cjk_font(path: str | None = None) -> str:
    if path is not None:
        if not os.path.isfile(path):
            raise FontNotFoundError(f"CJK font not found at {path}")
        return path
    for candidate in KNOWN_CJK_FONTS:
        if os.path.isfile(candidate):
            return candidate
    raise FontNotFoundError(
        f"no CJK font found (looked in {', '.join(KNOWN_CJK_FONTS)}); "
        f"install the Debian package {CJK_FONT_PACKAGE}: apt-get install -y {CJK_FONT_PACKAGE}"
    )


def label_metadata(*, content_id: str, provider: str, kind: str | None = None) -> dict:
    """The implicit-label fields of GB 45438-2025; ``Label`` "1" means AI-generated. ``kind`` (ours, beside the
    standard's fields) marks a preview."""
    fields = {
        "Label": "1",
        "ContentProducer": provider,
        "ProduceID": content_id,
        "ReservedCode1": "",
        "ContentPropagator": provider,
        "PropagateID": content_id,
        "ReservedCode2": "",
    }
    if kind is not None:
        fields["Kind"] = kind
    return fields


def label_policy() -> dict:
    """How every generated image is labelled, as this module does it (published by the disclosure endpoint)."""
    return {
        "standard": "GB 45438-2025",
        "visible": {"text": LABEL_TEXT, "position": "bottom_right", "text_height_ratio": TEXT_HEIGHT_RATIO,
                    "min_text_px": MIN_TEXT_PX},
        "metadata": {"key": METADATA_KEY, "png": "iTXt chunk",
                     "jpeg": f"XMP {XMP_PREFIX}:{METADATA_KEY} ({XMP_NAMESPACE}), EXIF ImageDescription and UserComment",
                     "fields": list(label_metadata(content_id="", provider=""))},
        "preview": {"visible_text": PREVIEW_LABEL_TEXT, "metadata": {"Kind": PREVIEW_KIND}},
    }


def label_image(
    image: Image.Image, *, content_id: str, provider: str, font_path: str | None = None, fmt: str = "PNG",
    kind: str | None = None,
) -> bytes:
    """The image with its visible label drawn on, encoded as ``fmt`` (PNG or JPEG) with the metadata label;
    ``kind=PREVIEW_KIND`` labels a preview (both labels say so)."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"unsupported label format {fmt!r}; use PNG or JPEG")

    text = PREVIEW_LABEL_TEXT if kind == PREVIEW_KIND else LABEL_TEXT
    labelled = draw_visible_label(image, font_path=font_path, text=text)
    metadata_json = json.dumps(label_metadata(content_id=content_id, provider=provider, kind=kind),
                               ensure_ascii=True)
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngInfo()
        info.add_itxt(METADATA_KEY, metadata_json)
        labelled.save(buffer, format="PNG", pnginfo=info)
    else:
        labelled.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, exif=_label_exif(metadata_json),
                                     xmp=label_xmp(metadata_json))
    return buffer.getvalue()


def draw_visible_label(image: Image.Image, *, font_path: str | None = None, text: str = LABEL_TEXT) -> Image.Image:
    base = image.convert("RGBA")
    width, height = base.size
    short_side = min(width, height)
    text_px = max(MIN_TEXT_PX, round(short_side * TEXT_HEIGHT_RATIO))
    font = ImageFont.truetype(find_cjk_font(font_path), size=text_px)

    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    padding = max(3, round(text_px * 0.35))
    margin = max(2, round(short_side * 0.02))
    plate_width = (right - left) + 2 * padding
    plate_height = (bottom - top) + 2 * padding
    plate_x = width - margin - plate_width
    plate_y = height - margin - plate_height
    draw.rounded_rectangle(
        (plate_x, plate_y, plate_x + plate_width, plate_y + plate_height),
        radius=max(2, padding // 2),
        fill=(0, 0, 0, PLATE_OPACITY),
    )
    draw.text((plate_x + padding - left, plate_y + padding - top), text, font=font, fill=(255, 255, 255, 255))
    composed = Image.alpha_composite(base, overlay)
    return composed if image.mode == "RGBA" else composed.convert("RGB")


def _label_exif(metadata_json: str) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = metadata_json
    exif.get_ifd(EXIF_IFD_POINTER)[EXIF_USER_COMMENT] = USER_COMMENT_ASCII_PREFIX + metadata_json.encode("ascii")
    return exif


def label_xmp(metadata_json: str) -> bytes:
    """The XMP packet that carries the metadata label in a JPEG."""
    return XMP_PACKET.format(prefix=XMP_PREFIX, namespace=XMP_NAMESPACE, key=METADATA_KEY,
                             value=escape(metadata_json)).encode("utf-8")


def _xmp_label_text(packet) -> str | None:
    if not packet:
        return None
    try:
        root = ElementTree.fromstring(packet if isinstance(packet, bytes) else packet.encode("utf-8"))
    except ElementTree.ParseError:
        return None
    element = root.find(f".//{{{XMP_NAMESPACE}}}{METADATA_KEY}")
    return element.text if element is not None else None


def media_type(data: bytes) -> str:
    """The media type of an encoded label image: image/jpeg or image/png."""
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"


def png_info_for(image: Image.Image) -> PngInfo:
    """PngInfo carrying the AIGC chunk of an opened PNG, to pass as ``pnginfo=`` when re-saving it."""
    info = PngInfo()
    text = getattr(image, "text", {}).get(METADATA_KEY)
    if text is not None:
        info.add_itxt(METADATA_KEY, text)
    return info


def read_label(data: bytes) -> dict | None:
    """The metadata label of an encoded image, or None if it has none (or it is unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            candidates = [getattr(image, "text", {}).get(METADATA_KEY)] if image.format == "PNG" else []
            candidates.append(_xmp_label_text(image.info.get("xmp")))
            exif = image.getexif()
            candidates.append(_user_comment_text(exif.get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)))
            candidates.append(exif.get(EXIF_IMAGE_DESCRIPTION))
    except (OSError, ValueError, SyntaxError):
        return None
    for text in candidates:
        parsed = _parse_label_json(text)
        if parsed is not None:
            return parsed
    return None


def _user_comment_text(value) -> str | None:
    if isinstance(value, bytes):
        for prefix, encoding in ((USER_COMMENT_ASCII_PREFIX, "ascii"), (b"UNICODE\x00", "utf-16")):
            if value.startswith(prefix):
                return value[len(prefix):].decode(encoding, errors="replace")
        return value.decode("utf-8", errors="replace")
    return value


def _parse_label_json(text) -> dict | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = json.loads(text.strip("\x00"))
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and "Label" in parsed else None
