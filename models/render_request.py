"""What the renderer is asked to draw, as plain data: the domain builds it without loading torch (models.render
draws it)."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class RenderRequest:
    """What to draw for one template set."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = 20
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    lora_scale: float = 1.0
    style_lora: bytes | None = None
    style_scale: float = 0.0
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float = 0.75
