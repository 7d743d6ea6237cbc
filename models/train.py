"""Personal LoRA training on a resident Stable Diffusion base, in the style of diffusers' DreamBooth-LoRA example.

The base pipeline is borrowed, not owned: the adapter is injected into ``pipe.unet`` for the run and removed again
afterwards, so a worker can keep one base in memory for user after user. Runs in-process (no multiprocessing,
no DataLoader workers) because the job worker does not fork.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, replace
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
# Steps between the host syncs that read the losses back (to check they are finite and report them): a sync a step
# would keep the CPU from running ahead of the GPU, and the loop is bound by that launch overhead at batch 1.
LOSS_CHECK_EVERY = 25


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
    compile_mode: str | None = None  # a torch.compile mode for the UNet ("default", "reduce-overhead"); None: eager
    compile_backend: str = "inductor"  # tests and toy runs pass "eager" to exercise compiling without a C++ build

    def total_steps(self, image_count: int) -> int:
        """Optimizer steps: ``steps`` (default min(200 × photos, 800)) counts images seen, so a batch of B takes
        ceil(steps / B) of them."""
        images_seen = self.steps if self.steps is not None else min(STEPS_PER_IMAGE * image_count, MAX_STEPS)
        return math.ceil(images_seen / self.batch_size)

    @classmethod
    def for_recipe(cls, recipe: str, **fields) -> "TrainConfig":
        if recipe not in TRAIN_RECIPES:
            raise TrainingError("unknown_train_recipe", f"recipe {recipe!r}; known: {sorted(TRAIN_RECIPES)}")
        return replace(cls(**fields), **TRAIN_RECIPES[recipe])


# How a training spends its image budget. `standard` is the DreamBooth-LoRA example's batch 1; `batched` sees the same
# images in a quarter of the steps, the learning rate scaled with the batch (Adam's step size does not grow with it),
# which a GPU runs in far less time because a step at batch 1 is bound by operator launches, not arithmetic.
TRAIN_RECIPES = {
    "standard": {"batch_size": 1, "learning_rate": 1e-4},
    "batched": {"batch_size": 4, "learning_rate": 4e-4},
}


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
    compute_dtype = unet.dtype  # a walk over every module: once, not per step
    # Draws happen where the tensors live, so a step copies nothing from the host.
    generator = torch.Generator(device=device).manual_seed(config.seed)

    # Both encodings are fixed for the whole run: encode once, sample the latent distribution per step.
    latent_mean, latent_std = (tensor.to(device) for tensor in
                               _encode_latent_distribution(pipe, images, config.resolution))
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(caption, device, 1, False)
    batch_prompt_embeds = prompt_embeds.expand(config.batch_size, -1, -1)
    scaling_factor = pipe.vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

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
        optimizer = torch.optim.AdamW(lora_parameters, lr=config.learning_rate, weight_decay=1e-2,
                                      fused=device.type == "cuda")
        # The wrapper shares the UNet's parameters and is dropped after the run; the base itself is never compiled.
        denoise = (torch.compile(unet, mode=config.compile_mode, backend=config.compile_backend)
                   if config.compile_mode else unet)

        best_score = -math.inf
        best_state: dict[str, torch.Tensor] | None = None
        unchecked_losses: list[torch.Tensor] = []
        unet.train()
        for step in range(1, total_steps + 1):
            picks = torch.randint(len(images), (config.batch_size,), generator=generator, device=device)
            sample_noise = torch.randn(latent_mean[picks].shape, generator=generator, device=device)
            latents = (latent_mean[picks] + latent_std[picks] * sample_noise) * scaling_factor
            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(0, num_train_timesteps, (config.batch_size,), generator=generator,
                                      device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise

            with _mixed_precision(device):
                model_pred = denoise(noisy_latents.to(compute_dtype), timesteps, batch_prompt_embeds,
                                     return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            unchecked_losses.append(loss.detach())

            validating = _is_validation_step(step, total_steps, config, score_validation)
            if validating or step % LOSS_CHECK_EVERY == 0 or step == total_steps:
                _check_losses(unchecked_losses, step, on_loss)
            if progress is not None:
                progress(step, total_steps)
            if validating:
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


def _mixed_precision(device: torch.device):
    """bf16 autocast on CUDA (its range needs no loss scaling, unlike fp16); elsewhere the base's own precision."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_losses(losses: list[torch.Tensor], last_step: int, on_loss: Callable[[int, float], None] | None) -> None:
    """Read the window's losses back in one sync, fail on the first that is not finite, report them; empties it."""
    values = torch.stack(losses).tolist()
    losses.clear()
    first_step = last_step - len(values) + 1
    for step, value in enumerate(values, start=first_step):
        if not math.isfinite(value):
            raise TrainingError("loss_not_finite", f"loss became {value} at step {step}")
        if on_loss is not None:
            on_loss(step, value)


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
