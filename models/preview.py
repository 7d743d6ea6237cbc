"""A preview portrait without training: the front photo as an image prompt (IP-Adapter) on the base model.

The previewer owns a base pipeline of its own, with the adapter loaded once and kept resident. It never shares
the renderer's UNet: ``load_ip_adapter`` swaps the UNet's attention processors and adds an image projection, which
would break the renderer's plain calls, and a LoRA the renderer leaves loaded would leak one user's identity into
another user's preview.

Weights come from a local folder in the layout of h94/IP-Adapter's ``models/`` folder: the adapter file (e.g.
``ip-adapter_sd15.safetensors``) next to ``image_encoder/`` (a CLIPVisionModelWithProjection). Without one, a
tiny random adapter matching the tiny pipeline is written to a temporary folder in that same layout and read back
through ``load_ip_adapter``, so tests run the real loading path; nothing is ever downloaded.
"""

from __future__ import annotations

import os
import tempfile

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from models.pipeline import load_base_pipeline

IMAGE_ENCODER_FOLDER = "image_encoder"
TINY_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
# The plain IP-Adapter projects one CLIP image embedding to this many extra context tokens.
IP_ADAPTER_TOKENS = 4
TINY_IMAGE_SIZE = 32
TINY_VISION_WIDTH = 32
TINY_PROJECTION_DIM = 32


def _cross_attention_hidden_sizes(unet) -> list[int]:
    """The hidden size of each cross-attention layer, in the order IP-Adapter files number them (1, 3, 5, ...):
    diffusers' UNet2DConditionModel._convert_ip_adapter_attn_to_diffusers reads them in this order."""
    channels = list(unet.config.block_out_channels)
    sizes = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            sizes.append(channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        else:
            sizes.append(channels[int(name[len("down_blocks.")])])
    return sizes


def write_tiny_ip_adapter(directory: str, unet, seed: int = 0) -> str:
    """A random IP-Adapter for ``unet`` in h94's layout under ``directory``; returns the weight file's name."""
    cross_attention_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=TINY_VISION_WIDTH, intermediate_size=2 * TINY_VISION_WIDTH, num_hidden_layers=2,
            num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=TINY_PROJECTION_DIM))
        weights = {
            "image_proj.proj.weight": torch.randn(cross_attention_dim * IP_ADAPTER_TOKENS, TINY_PROJECTION_DIM) * 0.1,
            "image_proj.proj.bias": torch.zeros(cross_attention_dim * IP_ADAPTER_TOKENS),
            "image_proj.norm.weight": torch.ones(cross_attention_dim),
            "image_proj.norm.bias": torch.zeros(cross_attention_dim),
        }
        for index, hidden_size in enumerate(_cross_attention_hidden_sizes(unet)):
            key_id = 2 * index + 1
            for projection in ("to_k_ip", "to_v_ip"):
                weights[f"ip_adapter.{key_id}.{projection}.weight"] = (
                    torch.randn(hidden_size, cross_attention_dim) * 0.1)
    encoder.save_pretrained(os.path.join(directory, IMAGE_ENCODER_FOLDER))
    safetensors.torch.save_file(weights, os.path.join(directory, TINY_ADAPTER_WEIGHT_NAME))
    return TINY_ADAPTER_WEIGHT_NAME


class Previewer:
    """One preview at a time per instance (not thread-safe), on its own resident pipeline."""

    def __init__(self, pipe: StableDiffusionPipeline, adapter_path: str, weight_name: str, scale: float):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipe.load_ip_adapter(adapter_path, subfolder="", weight_name=weight_name,
                             image_encoder_folder=IMAGE_ENCODER_FOLDER, local_files_only=True)
        pipe.set_ip_adapter_scale(scale)
        self.pipe = pipe

    def warm_up(self) -> None:
        """One small draw, so the first user's preview does not pay the first call's set-up (measured: 15 s of a
        2-step tiny draw on a loaded CPU, against 2-6 s afterwards)."""
        self.render(face=Image.new("RGB", (64, 64), (128, 128, 128)), prompt="a portrait", steps=1, width=64,
                    height=64)

    def render(self, *, face: Image.Image, prompt: str, negative_prompt: str = "", steps: int = 20,
               guidance: float = 6.0, width: int = 512, height: int = 512, seed: int = 0) -> Image.Image:
        if steps < 1 or width < 8 or height < 8:
            raise ValueError("steps must be >= 1, width and height >= 8")
        factor = self.pipe.vae_scale_factor
        image = self.pipe(
            prompt=prompt, negative_prompt=negative_prompt or None, ip_adapter_image=face.convert("RGB"),
            num_inference_steps=steps, guidance_scale=guidance,
            width=-(-width // factor) * factor, height=-(-height // factor) * factor,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        ).images[0]
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def load_previewer(base_path: str | None, adapter_path: str | None, weight_name: str, scale: float,
                   device: str | None = None) -> Previewer:
    """base_path=None -> the tiny pipeline with a tiny random adapter (adapter_path must be None too); else the
    base model's folder and the adapter's folder, both local."""
    pipe = load_base_pipeline(base_path, device)
    if adapter_path is not None:
        return Previewer(pipe, adapter_path, weight_name, scale)
    if base_path is not None:
        raise ValueError("a real base model needs a real IP-Adapter (IP_ADAPTER_PATH)")
    with tempfile.TemporaryDirectory(prefix="tiny-ip-adapter-") as directory:
        tiny_weight = write_tiny_ip_adapter(directory, pipe.unet)
        return Previewer(pipe, directory, tiny_weight, scale)
