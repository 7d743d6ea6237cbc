"""Sample photos for the demo, tests and benchmarks: real faces shipped inside installed wheels, plus realistic degradations.

Sources (all read from files inside installed packages; nothing is downloaded):
- scikit-image ``skimage/data/astronaut.png``: Eileen Collins (NASA, public domain) -- "the user".
- matplotlib ``mpl-data/sample_data/grace_hopper.jpg``: Grace Hopper (US Navy, public domain) -- "another person".
- scikit-image ``coffee.png`` and ``chelsea.png`` (a cat): real photos without a human face.

Every factory returns encoded bytes (JPEG unless stated) so tests exercise the real upload path.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zlib
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# Eileen Collins' face box in astronaut.png (dlib HOG, upsample 1): left, top, right, bottom.
ASTRONAUT_FACE_BOX = (175, 76, 265, 166)
# Grace Hopper's face box in grace_hopper.jpg (dlib HOG, upsample 1).
GRACE_HOPPER_FACE_BOX = (180, 139, 366, 325)


def _package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


@lru_cache(maxsize=None)
def _load_rgb(package: str, *parts: str) -> Image.Image:
    with Image.open(_package_file(package, *parts)) as im:
        return im.convert("RGB")


def astronaut_image() -> Image.Image:
    return _load_rgb("skimage", "data", "astronaut.png").copy()


def grace_hopper_image() -> Image.Image:
    return _load_rgb("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg").copy()


def coffee_image() -> Image.Image:
    return _load_rgb("skimage", "data", "coffee.png").copy()


def chelsea_cat_image() -> Image.Image:
    return _load_rgb("skimage", "data", "chelsea.png").copy()


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        params.setdefault("quality", 92)
        image = image.convert("RGB")
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _augment(image: Image.Image, face_box: tuple[int, int, int, int], rng: np.random.Generator, index: int) -> Image.Image:
    """One distinct-looking photo of the same person: crop, flip, small rotation, exposure, scale."""
    left, top, right, bottom = face_box
    face_w = right - left
    width, height = image.size
    # Crop: a window 2.6-5x the face width that always contains the face with some margin.
    crop_w = int(min(width, height, face_w * rng.uniform(2.6, 5.0)))
    crop_h = int(min(height, crop_w * rng.uniform(0.95, 1.35)))
    min_x, max_x = max(0, right + face_w // 3 - crop_w), min(width - crop_w, left - face_w // 3)
    min_y, max_y = max(0, bottom + face_w // 2 - crop_h), min(height - crop_h, top - face_w // 3)
    x0 = int(rng.integers(min_x, max(min_x, max_x) + 1))
    y0 = int(rng.integers(min_y, max(min_y, max_y) + 1))
    photo = image.crop((x0, y0, x0 + crop_w, y0 + crop_h))
    if index % 2 == 1:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = photo.rotate(float(rng.uniform(-9, 9)), resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    photo = ImageEnhance.Brightness(photo).enhance(float(rng.uniform(0.8, 1.2)))
    photo = ImageEnhance.Contrast(photo).enhance(float(rng.uniform(0.85, 1.15)))
    photo = ImageEnhance.Color(photo).enhance(float(rng.uniform(0.7, 1.3)))
    scale = rng.uniform(1.2, 2.6)
    return photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.Resampling.LANCZOS)


def astronaut_photos(n: int = 21, seed: int = 7) -> list[bytes]:
    """``n`` distinct JPEG photos of one real person (the astronaut), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    base = astronaut_image()
    return [encode(_augment(base, ASTRONAUT_FACE_BOX, rng, i), quality=int(rng.integers(82, 96))) for i in range(n)]


def grace_hopper_photos(n: int = 3, seed: int = 11) -> list[bytes]:
    """Photos of a second real person (Grace Hopper)."""
    rng = np.random.default_rng(seed)
    base = grace_hopper_image()
    return [encode(_augment(base, GRACE_HOPPER_FACE_BOX, rng, i)) for i in range(n)]



def astronaut_photo() -> bytes:
    """The plain astronaut portrait, upscaled to a phone-like size."""
    return encode(astronaut_image().resize((1024, 1024), Image.Resampling.LANCZOS))


def phone_sized_image(size: tuple[int, int] = (4000, 3000)) -> Image.Image:
    """A 12 MP phone photo: the astronaut portrait upscaled to 70% of the height inside a plain wall-coloured canvas
    (``size`` scales the whole picture, so other sizes are the same photo at another resolution)."""
    width, height = size
    canvas = Image.new("RGB", (width, height), (214, 208, 200))
    side = round(height * 14 / 15)
    canvas.paste(astronaut_image().resize((side, side), Image.Resampling.LANCZOS),
                 (round(width * 0.15), round(height / 15)))
    return canvas


def phone_selfie_image(size: tuple[int, int] = (4000, 3000), face_fraction: float = 0.4) -> Image.Image:
    """A 12 MP selfie: the astronaut's head and shoulders upscaled until the face is ``face_fraction`` of the height."""
    width, height = size
    left, top, right, bottom = ASTRONAUT_FACE_BOX
    crop_height = (bottom - top) / face_fraction
    crop_width = crop_height * width / height
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    image = astronaut_image()
    if crop_width > image.width or crop_height > image.height:
        raise ValueError(f"the astronaut portrait cannot frame its face at {face_fraction} of the height")
    x0 = min(max(0.0, centre_x - crop_width / 2), image.width - crop_width)
    y0 = min(max(0.0, centre_y - crop_height * 0.45), image.height - crop_height)
    return image.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + crop_width, y0 + crop_height))


def grace_hopper_photo() -> bytes:
    return encode(grace_hopper_image())


def non_face_photos() -> dict[str, bytes]:
    return {"coffee": encode(coffee_image()), "chelsea_cat": encode(chelsea_cat_image())}


def blurry_photo(radius: float = 6.0) -> bytes:
    """Out-of-focus portrait: the face is still detectable but has no fine detail."""
    image = astronaut_image().resize((1024, 1024), Image.Resampling.LANCZOS)
    return encode(image.filter(ImageFilter.GaussianBlur(radius)))


def dark_photo(factor: float = 0.22) -> bytes:
    """Underexposed portrait (night shot without flash)."""
    return encode(ImageEnhance.Brightness(astronaut_image().resize((1024, 1024))).enhance(factor))


def overexposed_photo() -> bytes:
    """Blown-out portrait: exposure pushed (gamma 0.3, gain 1.1) until much of the skin clips to white."""
    image = np.asarray(astronaut_image().resize((1024, 1024)), dtype=np.float32) / 255.0
    blown = (np.clip(image ** 0.3 * 1.1, 0, 1) * 255).astype(np.uint8)
    return encode(Image.fromarray(blown))


def tiny_photo(side: int = 200) -> bytes:
    """A thumbnail-sized upload (below the minimum side)."""
    return encode(astronaut_image().resize((side, side), Image.Resampling.LANCZOS))


def small_face_photo() -> bytes:
    """A real face that is too small in the frame: the portrait shrunk into a wide, plain scene."""
    canvas = Image.new("RGB", (1200, 900), (112, 140, 96))
    person = astronaut_image().resize((256, 256), Image.Resampling.LANCZOS)
    canvas.paste(person, (470, 320))
    return encode(canvas)


def two_faces_photo(second_scale: float = 1.0) -> bytes:
    """Astronaut with Grace Hopper beside her; ``second_scale`` sizes Grace's face relative to the astronaut's."""
    astronaut = astronaut_image().resize((1024, 1024), Image.Resampling.LANCZOS)
    astro_face_w = (ASTRONAUT_FACE_BOX[2] - ASTRONAUT_FACE_BOX[0]) * 2
    grace = grace_hopper_image()
    grace_face_w = GRACE_HOPPER_FACE_BOX[2] - GRACE_HOPPER_FACE_BOX[0]
    factor = astro_face_w * second_scale / grace_face_w
    grace = grace.resize((max(1, int(grace.width * factor)), max(1, int(grace.height * factor))), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (1024 + grace.width + 40, 1024), (200, 200, 205))
    canvas.paste(astronaut, (0, 0))
    canvas.paste(grace, (1024 + 20, 40))
    return encode(canvas)


def head_turned_photo(squeeze: float = 0.35) -> bytes:
    """Simulated head turn: one half of the face compressed horizontally (a strong yaw look-alike).

    The face's left half keeps its width while the right half is squeezed to ``squeeze`` of it, which moves
    the nose towards one cheek the way a turned head does.
    """
    image = astronaut_image().resize((1024, 1024), Image.Resampling.LANCZOS)
    left, top, right, bottom = (v * 2 for v in ASTRONAUT_FACE_BOX)
    centre = (left + right) // 2
    band_right = right + 120
    strip = image.crop((centre, 0, band_right, image.height))
    squeezed = strip.resize((max(1, int(strip.width * squeeze)), image.height), Image.Resampling.LANCZOS)
    tail = image.crop((band_right, 0, image.width, image.height))
    out = Image.new("RGB", (centre + squeezed.width + tail.width, image.height))
    out.paste(image.crop((0, 0, centre, image.height)), (0, 0))
    out.paste(squeezed, (centre, 0))
    out.paste(tail, (centre + squeezed.width, 0))
    return encode(out)


def exif_rotated_photo(orientation: int = 6) -> bytes:
    """A phone photo stored sideways with an EXIF Orientation tag that says how to turn it upright.

    Orientation 6 means "rotate 90 degrees clockwise to view": the pixels are stored turned 90 degrees
    counter-clockwise, as a phone held in portrait writes them.
    """
    upright = astronaut_image().resize((1024, 1024), Image.Resampling.LANCZOS)
    stored = {
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, exif=exif.tobytes())


def png_photo() -> bytes:
    return encode(astronaut_image().resize((768, 768)), "PNG")


def webp_photo() -> bytes:
    return encode(astronaut_image().resize((768, 768)), "WEBP", quality=90)


def gif_photo() -> bytes:
    """A real portrait in a format the intake does not accept."""
    return encode(astronaut_image().resize((768, 768)), "GIF")


def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb).

    Only the signature, IHDR and a short IDAT are written: decoding it would need gigabytes, reading the
    header needs nothing.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def not_an_image_bytes() -> bytes:
    return b"%PDF-1.4\n% this is a document, not a photo\n" + bytes(range(256)) * 4


def oversized_file(size: int = 16 * 1024 * 1024) -> bytes:
    """A real JPEG padded past the byte limit (trailing bytes after EOI are ignored by decoders)."""
    data = astronaut_photo()
    return data + b"\x00" * max(0, size - len(data))


def darker_skin_photo(data: bytes, analyzer, factor: float = 0.3) -> bytes:
    """A proxy for a darker-skinned face in the same good light: the skin of the largest face multiplied by
    ``factor``, while the eyes, the inside of the mouth, hair, clothes and background keep their pixels.

    A multiplication keeps the skin's own contrast (every ratio between two skin pixels), as a darker skin under the
    same light would; what it cannot reproduce is the real thing's specular shine, which skin tone does not darken,
    nor how real skin of another tone scatters light. ``analyzer`` is a models.faces.FaceAnalyzer (for landmarks).
    """
    rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    face = analyzer.faces(rgb)[0]
    points = face.landmarks.astype(np.int32)
    centre_x = int(points[:, 0].mean())
    # The jaw line and the brows raised and widened to take in the forehead, the temples and the ears.
    upper = points[17:27].copy()
    upper[:, 1] -= int(0.55 * face.height)
    outline = np.concatenate([points[0:17], upper, points[[0, 16]]])
    outline[:, 0] = centre_x + (outline[:, 0] - centre_x) * 1.18
    mask = np.zeros(rgb.shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(outline), 255)
    for part in (points[36:42], points[42:48], points[60:68]):
        cv2.fillConvexPoly(mask, cv2.convexHull(part), 0)
    # Skin only: leave the hair (dark, low-saturation) and the eye whites and teeth (bright, low-saturation) alone.
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    mask[(hsv[..., 1] < 40) & ((hsv[..., 2] < 70) | (hsv[..., 2] > 170))] = 0
    soft = cv2.GaussianBlur(mask, (0, 0), max(1.0, face.width / 60)).astype(np.float32)[..., None] / 255
    darker = rgb.astype(np.float32) * (1 - soft * (1 - factor))
    return encode(Image.fromarray(darker.clip(0, 255).astype(np.uint8)))
