"""Base Stable Diffusion pipelines: a tiny random one for tests and a local SD1.5-layout folder for production.

Nothing here touches the network: the tiny pipeline is built from configs (its tokenizer from vocab/merges
files written by code), and a real base is read with ``local_files_only``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_CROSS_ATTENTION_DIM = 32
TINY_MAX_TOKENS = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {byte: chr(cp) for byte, cp in zip(printable, codepoints)}


def _write_byte_level_vocab(directory: str) -> None:
    """vocab.json + merges.txt with every byte (alone and word-final) and no merges: any text tokenizes."""
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [BOS_TOKEN, EOS_TOKEN]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(tokens)}, handle, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")


def build_tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as directory:
        _write_byte_level_vocab(directory)
        return CLIPTokenizer.from_pretrained(directory, model_max_length=TINY_MAX_TOKENS, local_files_only=True)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A structurally faithful, randomly initialised SD pipeline small enough for CPU tests.

    512x512 images map to 64x64 latents (8x VAE); attention only runs at the 32x32 level to keep CPU time low.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
        )
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_CROSS_ATTENTION_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_MAX_TOKENS,
                projection_dim=TINY_CROSS_ATTENTION_DIM,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base_pipeline(path: str | None, device: str | None = None) -> StableDiffusionPipeline:
    """path=None -> the tiny pipeline; else a local diffusers folder in the SD1.5 layout (never downloads)."""
    device = device or pick_device()
    if path is None:
        return build_tiny_pipeline().to(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
