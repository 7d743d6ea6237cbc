"""Albums of several people: the scene drawn on the base model, then each face region redrawn with its owner's LoRA.

A template of several people names one box per person (``face_regions``: render pixels, left to right). A candidate is
drawn in two stages on one Renderer (the same base weights and resident LoRA slot as single portraits):

1. the scene, on the base weights alone, with the prompt naming every member ("a woman and a man");
2. for each region, an inpainting of *that scene* inside the region's mask (a feathered ellipse over face and hair,
   white = redraw) with the region owner's LoRA and a prompt naming that owner (their trigger token), sampled on a
   window around the region (face_window) rather than the whole picture; the redrawn box is pasted into the
   candidate.

Every region is redrawn from the same scene rather than from the previous region's result, so a face depends only
on the scene and on its owner's LoRA: member j's weights never reach member i's face, and the order of the regions
does not matter. Outside every mask the candidate is the scene, pixel for pixel (the renderer pastes the init pixels
back outside its mask, and the masks lie inside their boxes, which do not overlap).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from PIL import Image, ImageDraw, ImageFilter

from models.render_request import RenderRequest

if TYPE_CHECKING:  # the domain plans album draws from this module without loading torch
    from models.render import Renderer

# The feathered edge of a region's mask, as a share of the box's shorter side: the redrawn face fades into the scene.
MASK_FEATHER = 0.08
# A region is redrawn with the later share of the schedule: enough to change who the face is, not where it sits.
FACE_STRENGTH = 0.75
FACE_SEED_STRIDE = 7919
# A region is redrawn in a window around its box (this share of the box's size added on every side, within the
# picture): the face sees enough of its surroundings to match their light, and the model samples a fraction of the
# picture per face instead of all of it (bench/bench_album.py).
FACE_CONTEXT = 0.5
LATENT_MULTIPLE = 8

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class AlbumFace:
    """One member's face region and what redraws it."""

    box: Box  # x0, y0, x1, y1 in render pixels
    lora: bytes
    prompt: str  # the scene's prompt naming this member alone (their trigger token and class word)
    lora_scale: float = 1.0
    adapter_name: str = "user"
    strength: float = FACE_STRENGTH


def region_mask(size: tuple[int, int], box: Box, feather: float = MASK_FEATHER) -> Image.Image:
    """An L-mode mask of ``size`` (white = redraw): an ellipse filling ``box`` (face and hair), its edge feathered
    inward, zero everywhere outside the box. Deterministic: the same size and box give the same bytes."""
    x0, y0, x1, y1 = box
    width, height = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {box} is not inside {width}x{height}")
    radius = max(1, round(min(x1 - x0, y1 - y0) * feather))
    inner = Image.new("L", (x1 - x0, y1 - y0), 0)
    # The ellipse is inset by the feather's radius, so the blur's falloff stays inside the box.
    ImageDraw.Draw(inner).ellipse((radius, radius, x1 - x0 - 1 - radius, y1 - y0 - 1 - radius), fill=255)
    inner = inner.filter(ImageFilter.GaussianBlur(radius / 2))
    mask = Image.new("L", size, 0)
    mask.paste(inner, (x0, y0))
    return mask


def face_window(size: tuple[int, int], box: Box, context: float = FACE_CONTEXT) -> Box:
    """The part of the picture a region is redrawn in: ``box`` grown by ``context`` of its size on every side,
    widened to a multiple of 8 pixels where the picture allows (the model's latent grid), kept inside the picture."""
    x0, y0, x1, y1 = box

    def span(low: int, high: int, limit: int) -> tuple[int, int]:
        margin = round((high - low) * context)
        start, end = max(0, low - margin), min(limit, high + margin)
        length = min(limit, -(-(end - start) // LATENT_MULTIPLE) * LATENT_MULTIPLE)
        start = min(start, limit - length)
        return start, start + length

    (wx0, wx1), (wy0, wy1) = span(x0, x1, size[0]), span(y0, y1, size[1])
    return wx0, wy0, wx1, wy1


def face_seed(seed: int, candidate: int, region: int) -> int:
    return (seed + FACE_SEED_STRIDE * (candidate * 16 + region + 1)) % 2**31


def draw_album(renderer: Renderer, scene: RenderRequest, faces: list[AlbumFace], *,
               on_candidate: Callable[[Image.Image], None] | None = None) -> list[Image.Image]:
    """``scene.num_images`` candidates: each a scene drawn on the base weights, then every face region redrawn with
    its owner's LoRA. ``on_candidate`` is called with each candidate as soon as it is composed (a caller can score
    it while the next one draws)."""
    if not faces:
        raise ValueError("an album draw needs at least one face region")
    size = (scene.width, scene.height)
    masks = [region_mask(size, face.box) for face in faces]
    candidates = []
    for index, drawn in enumerate(renderer.render_base(replace(scene, style_lora=None, style_scale=0.0))):
        composed = drawn.copy()
        for region, (face, mask) in enumerate(zip(faces, masks)):
            window = face_window(size, face.box)
            redraw = replace(scene, prompt=face.prompt, num_images=1, lora_scale=face.lora_scale, style_lora=None,
                             style_scale=0.0, seed=face_seed(scene.seed, index, region),
                             width=window[2] - window[0], height=window[3] - window[1],
                             init_image=drawn.crop(window), mask_image=mask.crop(window), strength=face.strength)
            redrawn = renderer.render_set(face.lora, redraw, adapter_name=face.adapter_name)[0]
            # Outside its mask the redraw is the scene exactly, so pasting its whole box adds only this face.
            x0, y0, x1, y1 = face.box
            composed.paste(redrawn.crop((x0 - window[0], y0 - window[1], x1 - window[0], y1 - window[1])), (x0, y0))
        if on_candidate is not None:
            on_candidate(composed)
        candidates.append(composed)
    return candidates
