"""Portrait rendering on a resident base pipeline with per-request LoRA adapters.

Each render loads the user's LoRA (and an optional style LoRA) as named adapters, renders, and removes them again,
so the base stays clean for the next user. A Renderer is not thread-safe: one render at a time per pipeline.

Composition (``init_image`` + ``mask_image``, white = repaint) runs StableDiffusionInpaintPipeline built from the
same components. With a standard 4-channel UNet that pipeline does latent-blending inpainting (the known region's
noised latents are re-imposed at every step); afterwards the init pixels are pasted back outside the mask, because
a VAE round trip never reproduces them exactly. ``init_image`` without a mask is plain img2img.
"""

from __future__ import annotations

import math
import time

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from models.train import lora_state_dict_from_bytes

STYLE_ADAPTER_SUFFIX = "__style"


class Renderer:
    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self._inpaint_pipe: StableDiffusionInpaintPipeline | None = None
        self._img2img_pipe: StableDiffusionImg2ImgPipeline | None = None
        self._last_swap_seconds = 0.0

    def render(
        self,
        *,
        lora: bytes,
        adapter_name: str,
        prompt: str,
        negative_prompt: str = "",
        num_images: int = 1,
        steps: int = 20,
        guidance: float = 7.0,
        width: int = 512,
        height: int = 512,
        seed: int = 0,
        lora_scale: float = 1.0,
        style_lora: bytes | None = None,
        style_scale: float = 0.0,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
        strength: float = 0.75,
    ) -> list[Image.Image]:
        if num_images < 1 or steps < 1 or width < 8 or height < 8:
            raise ValueError("num_images and steps must be >= 1, width and height >= 8")
        if mask_image is not None and init_image is None:
            raise ValueError("mask_image needs init_image")

        loaded: list[str] = []
        load_seconds = 0.0
        swap_started = time.perf_counter()
        try:
            names, weights = [adapter_name], [lora_scale]
            self.pipe.load_lora_weights(lora_state_dict_from_bytes(lora), adapter_name=adapter_name)
            loaded.append(adapter_name)
            if style_lora is not None and style_scale != 0:
                style_name = adapter_name + STYLE_ADAPTER_SUFFIX
                self.pipe.load_lora_weights(lora_state_dict_from_bytes(style_lora), adapter_name=style_name)
                loaded.append(style_name)
                names.append(style_name)
                weights.append(style_scale)
            self.pipe.set_adapters(names, adapter_weights=weights)
            load_seconds = time.perf_counter() - swap_started

            images = self._generate(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_images=num_images,
                steps=steps,
                guidance=guidance,
                width=width,
                height=height,
                seed=seed,
                init_image=init_image,
                mask_image=mask_image,
                strength=strength,
            )
        finally:
            unload_started = time.perf_counter()
            self._remove_adapters(loaded)
            self._last_swap_seconds = load_seconds + time.perf_counter() - unload_started
        return images

    def swap_seconds(self) -> float:
        """Seconds the last render spent loading and unloading its adapters."""
        return self._last_swap_seconds

    def _generate(
        self, *, prompt, negative_prompt, num_images, steps, guidance, width, height, seed, init_image, mask_image,
        strength,
    ) -> list[Image.Image]:
        # SD works on multiples of the VAE factor; render slightly larger and resize to the exact size asked.
        factor = self.pipe.vae_scale_factor
        render_width = math.ceil(width / factor) * factor
        render_height = math.ceil(height / factor) * factor
        common = dict(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_images_per_prompt=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        )
        if init_image is None:
            images = self.pipe(height=render_height, width=render_width, **common).images
            return [_exact_size(image, width, height) for image in images]

        # img2img and inpainting run only the last `strength` share of the schedule; make that at least one step.
        common["num_inference_steps"] = max(steps, math.ceil(1 / strength))
        init_exact = init_image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        init_for_model = init_exact.resize((render_width, render_height), Image.Resampling.LANCZOS)
        if mask_image is None:
            images = self._img2img()(image=init_for_model, strength=strength, **common).images
            return [_exact_size(image, width, height) for image in images]

        mask_exact = mask_image.convert("L").resize((width, height), Image.Resampling.NEAREST)
        mask_for_model = mask_exact.resize((render_width, render_height), Image.Resampling.NEAREST)
        images = self._inpaint()(
            image=init_for_model,
            mask_image=mask_for_model,
            height=render_height,
            width=render_width,
            strength=strength,
            **common,
        ).images
        return [Image.composite(_exact_size(image, width, height), init_exact, mask_exact) for image in images]

    def _inpaint(self) -> StableDiffusionInpaintPipeline:
        if self._inpaint_pipe is None:
            self._inpaint_pipe = StableDiffusionInpaintPipeline(
                **self._shared_components(), requires_safety_checker=False
            )
            self._inpaint_pipe.set_progress_bar_config(disable=True)
        return self._inpaint_pipe

    def _img2img(self) -> StableDiffusionImg2ImgPipeline:
        if self._img2img_pipe is None:
            self._img2img_pipe = StableDiffusionImg2ImgPipeline(
                **self._shared_components(), requires_safety_checker=False
            )
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    def _shared_components(self) -> dict:
        # Same module objects, so adapters loaded through self.pipe are active in the derived pipelines too.
        components = dict(self.pipe.components)
        components["safety_checker"] = None
        return components

    def _remove_adapters(self, names: list[str]) -> None:
        if names:
            self.pipe.delete_adapters(names)
        if not any(self.pipe.get_list_adapters().values()):
            # Strips the empty LoRA wrappers too, so base renders run at base speed.
            self.pipe.unload_lora_weights()


def _exact_size(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
