"""Personal LoRA training on a resident Stable Diffusion base, in the style of diffusers' DreamBooth-LoRA example.

The base pipeline is borrowed, not owned: the adapter is injected into ``pipe.unet`` for the run and removed again
afterwards, so a worker can keep one base in memory for user after user. Runs in-process (no multiprocessing,
no DataLoader workers) because the job worker does not fork.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TRAINING_ADAPTER_NAME = "portrait_training"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STEPS_PER_IMAGE = 200
MAX_STEPS = 800
VAE_ENCODE_CHUNK = 4


class TrainingError(RuntimeError):
    """Training could not produce a usable adapter; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: int | None = None  # None -> alpha = rank (LoRA scale 1)
    learning_rate: float = 1e-4
    steps: int | None = None  # None -> min(200 * photos, 800)
    resolution: int = 512
    seed: int = 0
    batch_size: int = 1
    validation_prompts: tuple = ()
    validate_every: int = 0
    validation_inference_steps: int = 20
    validation_guidance: float = 7.0

    def total_steps(self, image_count: int) -> int:
        if self.steps is not None:
            return self.steps
        return min(STEPS_PER_IMAGE * image_count, MAX_STEPS)


# What the UNet is trained to predict, as diffusers' schedulers name it; "sample" (x0) bases are not supported.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def train_lora(
    pipe: StableDiffusionPipeline,
    images: list[Image.Image],
    caption: str,
    config: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
    score_validation: Callable[[list[Image.Image]], float] | None = None,
    *,
    on_loss: Callable[[int, float], None] | None = None,
) -> bytes:
    """Train a UNet LoRA on ``images`` captioned ``caption``; return it as diffusers-format safetensors bytes.

    With ``score_validation`` and ``config.validate_every``, the validation prompts are rendered every
    ``validate_every`` steps (and at the last step) and the highest-scoring checkpoint is the one returned.
    """
    if not images:
        raise TrainingError("no_training_images", "at least one image is required")
    total_steps = config.total_steps(len(images))
    if total_steps < 1:
        raise TrainingError("invalid_step_count", f"steps must be >= 1, got {total_steps}")

    unet = pipe.unet
    if getattr(unet, "peft_config", None):
        raise TrainingError("base_has_adapters", f"unet already carries adapters {list(unet.peft_config)}")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise TrainingError("unknown_prediction_type",
                            f"the base model predicts {prediction_type!r}; training knows {sorted(PREDICTION_TYPES)}")
    device = unet.device
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    # Both encodings are fixed for the whole run: encode once, sample the latent distribution per step.
    latent_mean, latent_std = _encode_latent_distribution(pipe, images, config.resolution)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(caption, device, 1, False)
    scaling_factor = pipe.vae.config.scaling_factor

    requires_grad_before = {name: param.requires_grad for name, param in unet.named_parameters()}
    unet.requires_grad_(False)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)  # the LoRA init draws from the global RNG: seed it for reproducible runs
        unet.add_adapter(
            LoraConfig(
                r=config.rank,
                lora_alpha=config.alpha or config.rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            ),
            adapter_name=TRAINING_ADAPTER_NAME,
        )
    try:
        # LoRA parameters train in fp32 even on an fp16 base, as in the diffusers examples.
        cast_training_params(unet, dtype=torch.float32)
        lora_parameters = [param for param in unet.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(lora_parameters, lr=config.learning_rate, weight_decay=1e-2)

        best_score = -math.inf
        best_state: dict[str, torch.Tensor] | None = None
        unet.train()
        for step in range(1, total_steps + 1):
            picks = torch.randint(len(images), (config.batch_size,), generator=generator)
            sample_noise = torch.randn(latent_mean[picks].shape, generator=generator)
            latents = (latent_mean[picks] + latent_std[picks] * sample_noise) * scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
            ).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise

            model_pred = unet(
                noisy_latents.to(device, unet.dtype),
                timesteps.to(device),
                prompt_embeds.expand(config.batch_size, -1, -1),
            ).sample
            loss = F.mse_loss(model_pred.float(), target.to(device).float())
            if not torch.isfinite(loss):
                raise TrainingError("loss_not_finite", f"loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            if on_loss is not None:
                on_loss(step, loss.item())
            if progress is not None:
                progress(step, total_steps)
            if _is_validation_step(step, total_steps, config, score_validation):
                score = score_validation(_render_validation(pipe, config))
                if score > best_score:
                    best_score = score
                    best_state = _adapter_state_dict(unet, config)

        final_state = best_state if best_state is not None else _adapter_state_dict(unet, config)
        return _to_safetensors_bytes(final_state)
    finally:
        unet.unload_lora()
        for name, param in unet.named_parameters():
            param.requires_grad_(requires_grad_before.get(name, param.requires_grad))
        unet.eval()


def _encode_latent_distribution(
    pipe: StableDiffusionPipeline, images: list[Image.Image], resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior of each image (float32, on CPU)."""
    pixels = torch.stack([_to_pixel_tensor(image, resolution) for image in images])
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(VAE_ENCODE_CHUNK):
            posterior = pipe.vae.encode(chunk.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _to_pixel_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _is_validation_step(step, total_steps, config: TrainConfig, score_validation) -> bool:
    if score_validation is None or not config.validate_every or not config.validation_prompts:
        return False
    return step % config.validate_every == 0 or step == total_steps


def _render_validation(pipe: StableDiffusionPipeline, config: TrainConfig) -> list[Image.Image]:
    pipe.unet.eval()
    try:
        return pipe(
            list(config.validation_prompts),
            num_inference_steps=config.validation_inference_steps,
            guidance_scale=config.validation_guidance,
            height=config.resolution,
            width=config.resolution,
            generator=torch.Generator(device="cpu").manual_seed(config.seed),
        ).images
    finally:
        pipe.unet.train()


def _adapter_state_dict(unet, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' LoRA key format, fp32 on CPU, with alpha/rank folded into the up weights.

    Folding the scale in means the bytes need no adapter metadata: loading them from an in-memory dict (where
    diffusers assumes alpha == rank) gives exactly the trained delta.
    """
    peft_state = get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER_NAME)
    diffusers_state = convert_state_dict_to_diffusers(peft_state)
    scale = (config.alpha or config.rank) / config.rank
    folded = {}
    for key, tensor in diffusers_state.items():
        tensor = tensor.detach().to("cpu", torch.float32).clone()
        if ".lora.up." in key and scale != 1:
            tensor *= scale
        folded[key] = tensor.contiguous()
    return folded


def _to_safetensors_bytes(unet_lora_layers: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="lora-") as directory:
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=unet_lora_layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
        )
        with open(os.path.join(directory, LORA_WEIGHT_NAME), "rb") as handle:
            return handle.read()


def lora_state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA safetensors blob, ready for ``pipe.load_lora_weights``."""
    return safetensors.torch.load(data)
