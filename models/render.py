"""Portrait rendering on a resident base pipeline with one resident LoRA slot per adapter role.

The public entry point for "render one template set for a LoRA" is ``render_template_set(renderer, lora, request)``
(a ``RenderRequest`` says what to draw); ``Renderer.render(**fields)`` is the same call with the fields spelled out.

Resident slots: instead of injecting and removing the user's LoRA on every call (about a second per swap at SD1.5
size), the renderer keeps one peft adapter per role ("identity", "style") on ``pipe.unet`` and copies each user's
weights into it (``ResidentLoraSlot``). A LoRA of a lower rank is zero-padded into a wider slot; one of a higher rank,
or one that targets modules the slot lacks, re-shapes the slot (one re-inject). Between renders the slots are
zeroed and disabled, so a plain ``pipe(...)`` call on the same pipeline draws the base, and no user's weights stay
on the model. Training needs a UNet without adapters: call ``release_lora_slots(pipe)`` first (the renderer
re-creates its slots on its next render). A LoRA that is not a UNet-only diffusers LoRA (text-encoder keys, other
key formats) takes the old path: loaded as named adapters for the call and removed afterwards.

Optional fuse (``fuse=True``): for the sampling loop the slot's delta is added into the base weights and the
adapters are bypassed; afterwards the base weights are copied back from a resident backup, bit for bit (peft's
unmerge subtracts the delta again, which drifts in floating point), so nothing of one user reaches the next.

Prompt embeddings are cached per (prompt, negative prompt), so a template's text is encoded once per worker.
Candidates are drawn in one batch (``batch_size`` per pipeline call; the initial noise for the whole set is drawn
once, so smaller batches give the same images); ``on_images`` is called with each batch as soon as it is decoded,
so a caller can rank one batch while the next one samples.

Composition (``init_image`` + ``mask_image``, white = repaint) runs StableDiffusionInpaintPipeline built from the
same components. With a standard 4-channel UNet that pipeline does latent-blending inpainting (the known region's
noised latents are re-imposed at every step); afterwards the init pixels are pasted back outside the mask, because
a VAE round trip never reproduces them exactly. ``init_image`` without a mask is plain img2img. Both draw all
candidates in one call (their noise is drawn inside the pipeline).

A Renderer is not thread-safe: one render at a time per pipeline.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from PIL import Image

from models.render_request import RenderRequest
from models.train import lora_state_dict_from_bytes

STYLE_ADAPTER_SUFFIX = "__style"
IDENTITY_SLOT = "resident_identity"
STYLE_SLOT = "resident_style"
PROMPT_CACHE_ENTRIES = 128
# A UNet-only diffusers LoRA, as models.train writes it: unet.<module path>.lora.(down|up).weight
UNET_LORA_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")


class SlotMismatch(ValueError):
    """The LoRA is not a UNet-only diffusers LoRA; it cannot be copied into a resident slot."""


def parse_unet_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """{module path: (down, up)} and the highest rank of a UNet-only diffusers LoRA; SlotMismatch otherwise."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = UNET_LORA_KEY.match(key)
        if match is None:
            raise SlotMismatch(f"not a UNet-only diffusers LoRA key: {key}")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise SlotMismatch("the LoRA has no weights")
    modules = {}
    for module, pair in parts.items():
        if set(pair) != {"down", "up"} or pair["down"].dim() != 2 or pair["up"].dim() != 2 \
                or pair["down"].shape[0] != pair["up"].shape[1]:
            raise SlotMismatch(f"{module}: needs 2-d down and up weights of one rank")
        modules[module] = (pair["down"], pair["up"])
    return modules, max(down.shape[0] for down, _ in modules.values())


class ResidentLoraSlot:
    """One peft adapter kept on ``pipe.unet``; each user's LoRA weights are copied into it.

    Its shape (rank, modules) is read from the UNet's peft config on every load, not remembered, so two renderers on
    one pipeline, or a release for training in between, never leave it with a stale idea of the slot."""

    def __init__(self, pipe: StableDiffusionPipeline, name: str, min_rank: int = 0):
        self.pipe = pipe
        self.name = name
        self.min_rank = min_rank
        self.reshapes = 0  # how often this object injected the slot (anew): 1 for a worker whose LoRAs all fit

    def present(self) -> bool:
        return self.name in (getattr(self.pipe.unet, "peft_config", None) or {})

    @property
    def rank(self) -> int:
        return self.pipe.unet.peft_config[self.name].r if self.present() else 0

    @property
    def modules(self) -> dict[str, LoraLayer]:
        if not self.present():
            return {}
        # Not the config's target_modules: peft shortens a long list to the suffixes that match it ("to_k").
        return {path: module for path, module in self.pipe.unet.named_modules()
                if isinstance(module, LoraLayer) and self.name in module.lora_A}

    def load(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
        """Copy a parsed LoRA in: rows/columns beyond its rank and modules it does not target are zeroed."""
        if rank > self.rank or not set(weights) <= set(self.modules):
            self._inject(max(rank, self.rank, self.min_rank), set(weights) | set(self.modules))
        with torch.no_grad():
            for module_path, layer in self.modules.items():
                lora_a = layer.lora_A[self.name].weight
                lora_b = layer.lora_B[self.name].weight
                pair = weights.get(module_path)
                if pair is None:
                    lora_a.zero_()
                    lora_b.zero_()
                    continue
                down, up = pair
                if down.shape[1] != lora_a.shape[1] or up.shape[0] != lora_b.shape[0]:
                    raise SlotMismatch(f"{module_path}: LoRA shape {tuple(up.shape)}x{tuple(down.shape)} does not "
                                       f"fit the base layer")
                r = down.shape[0]
                lora_a[:r].copy_(down)
                lora_a[r:].zero_()
                lora_b[:, :r].copy_(up)
                lora_b[:, r:].zero_()

    def clear(self) -> None:
        if not self.present():
            return
        with torch.no_grad():
            for layer in self.modules.values():
                layer.lora_A[self.name].weight.zero_()
                layer.lora_B[self.name].weight.zero_()

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """up @ down at the layer's current scaling (adapter weight included), in the base weight's dtype."""
        lora_a = layer.lora_A[self.name].weight
        lora_b = layer.lora_B[self.name].weight
        base = layer.get_base_layer().weight
        return ((lora_b.float() @ lora_a.float()) * layer.scaling[self.name]).to(base.dtype)

    def _inject(self, rank: int, module_paths: set[str]) -> None:
        unet = self.pipe.unet
        if self.present():
            unet.delete_adapters(self.name)
        dtype = next(unet.parameters()).dtype
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=sorted(module_paths)), adapter_name=self.name)
        for layer in self.modules.values():
            layer.lora_A[self.name].to(dtype)
            layer.lora_B[self.name].to(dtype)
        self.reshapes += 1


def release_lora_slots(pipe: StableDiffusionPipeline) -> None:
    """Remove every adapter (resident slots included) from the pipeline, e.g. before training on it."""
    if getattr(pipe.unet, "peft_config", None):
        pipe.unload_lora_weights()


class Renderer:
    def __init__(self, pipe: StableDiffusionPipeline, *, fuse: bool = False, batch_size: int = 0,
                 min_slot_rank: int = 0):
        self.pipe = pipe
        self.fuse = fuse
        self.batch_size = batch_size  # candidates per pipeline call; 0: all in one call
        self.identity_slot = ResidentLoraSlot(pipe, IDENTITY_SLOT, min_slot_rank)
        self.style_slot = ResidentLoraSlot(pipe, STYLE_SLOT, min_slot_rank)
        self._inpaint_pipe: StableDiffusionInpaintPipeline | None = None
        self._img2img_pipe: StableDiffusionImg2ImgPipeline | None = None
        self._prompt_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._base_backup: dict[str, torch.Tensor] = {}
        self._last_swap_seconds = 0.0

    def render(self, *, lora: bytes, adapter_name: str = "user", prompt: str,
               on_images: Callable[[list[Image.Image]], None] | None = None, **fields) -> list[Image.Image]:
        """``render_set`` with the RenderRequest fields as keywords; ``adapter_name`` names the adapters only on
        the per-call path (a LoRA that cannot go into a resident slot)."""
        return self.render_set(lora, RenderRequest(prompt=prompt, **fields), on_images=on_images,
                               adapter_name=adapter_name)

    def render_set(self, lora: bytes, request: RenderRequest, *,
                   on_images: Callable[[list[Image.Image]], None] | None = None,
                   adapter_name: str = "user") -> list[Image.Image]:
        r = request
        if r.num_images < 1 or r.steps < 1 or r.width < 8 or r.height < 8:
            raise ValueError("num_images and steps must be >= 1, width and height >= 8")
        if r.mask_image is not None and r.init_image is None:
            raise ValueError("mask_image needs init_image")
        identity = lora_state_dict_from_bytes(lora)
        style = lora_state_dict_from_bytes(r.style_lora) if r.style_lora is not None and r.style_scale != 0 else None
        try:
            parsed = [parse_unet_lora(identity)] + ([parse_unet_lora(style)] if style is not None else [])
        except SlotMismatch:
            return self._render_per_call(identity, style, r, on_images, adapter_name)

        swap_started = time.perf_counter()
        slots = [self.identity_slot, self.style_slot][:len(parsed)]
        scales = [r.lora_scale, r.style_scale][:len(parsed)]
        fused = False
        load_seconds = 0.0
        try:  # whatever fails from here on, the slots are parked again: no user's weights stay behind
            for slot, (weights, rank) in zip(slots, parsed):
                slot.load(weights, rank)
            active = [(slot, scale) for slot, scale in zip(slots, scales) if scale != 0]
            if active:
                self.pipe.enable_lora()
                self.pipe.set_adapters([slot.name for slot, _ in active], adapter_weights=[s for _, s in active])
                if self.fuse:
                    fused = True
                    self._fuse([slot for slot, _ in active])
            else:
                self.pipe.disable_lora()  # every scale 0: the plain base, not an adapter at weight zero
            load_seconds = time.perf_counter() - swap_started
            return self._generate(r, on_images, cached_prompt=True)
        finally:
            unload_started = time.perf_counter()
            if fused:
                self._unfuse()
            self._park()
            self._last_swap_seconds = load_seconds + time.perf_counter() - unload_started

    def render_base(self, request: RenderRequest, *,
                    on_images: Callable[[list[Image.Image]], None] | None = None) -> list[Image.Image]:
        """``request`` drawn on the base weights alone (no user's LoRA, no style): an album's scene, whose faces are
        then redrawn region by region with each owner's LoRA (models.album)."""
        self._park()
        return self._generate(request, on_images, cached_prompt=True)

    def swap_seconds(self) -> float:
        """Seconds the last render spent putting its adapters in place and taking them out again."""
        return self._last_swap_seconds

    def _park(self) -> None:
        """Zero and disable the slots: the pipeline draws the base until the next render, and keeps no user."""
        self.identity_slot.clear()
        self.style_slot.clear()
        if getattr(self.pipe.unet, "peft_config", None):
            self.pipe.disable_lora()

    def _fuse(self, active: list[ResidentLoraSlot]) -> None:
        with torch.no_grad():
            for slot in active:
                for path, layer in slot.modules.items():
                    base = layer.get_base_layer().weight
                    if path not in self._base_backup:
                        # The base never changes (training leaves it as it was), so one copy serves every render.
                        self._base_backup[path] = base.detach().clone()
                    base.add_(slot.delta(layer))
        self.pipe.disable_lora()  # the sampling loop runs the fused base layers only

    def _unfuse(self) -> None:
        with torch.no_grad():
            for path, backup in self._base_backup.items():
                self.pipe.unet.get_submodule(path).get_base_layer().weight.copy_(backup)

    def _render_per_call(self, identity, style, r: RenderRequest, on_images, adapter_name) -> list[Image.Image]:
        """The path for a LoRA that does not fit a resident slot: named adapters loaded for this call only."""
        release_lora_slots(self.pipe)
        loaded: list[str] = []
        swap_started = time.perf_counter()
        load_seconds = 0.0
        try:
            names, weights = [adapter_name], [r.lora_scale]
            self.pipe.load_lora_weights(identity, adapter_name=adapter_name)
            loaded.append(adapter_name)
            if style is not None:
                style_name = adapter_name + STYLE_ADAPTER_SUFFIX
                self.pipe.load_lora_weights(style, adapter_name=style_name)
                loaded.append(style_name)
                names.append(style_name)
                weights.append(r.style_scale)
            self.pipe.set_adapters(names, adapter_weights=weights)
            load_seconds = time.perf_counter() - swap_started
            # A text-encoder LoRA changes the embeddings: no cache on this path.
            return self._generate(r, on_images, cached_prompt=False)
        finally:
            unload_started = time.perf_counter()
            if loaded:
                self.pipe.unload_lora_weights()
            self._last_swap_seconds = load_seconds + time.perf_counter() - unload_started

    def prompt_embeddings(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) embeddings for classifier-free guidance, encoded once per pair."""
        key = (prompt, negative_prompt)
        cached = self._prompt_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self.pipe.encode_prompt(prompt, self.pipe.device, 1, True, negative_prompt or None)
            self._prompt_cache[key] = cached
            if len(self._prompt_cache) > PROMPT_CACHE_ENTRIES:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(key)
        return cached

    def _generate(self, r: RenderRequest, on_images, *, cached_prompt: bool) -> list[Image.Image]:
        # SD works on multiples of the VAE factor; render slightly larger and resize to the exact size asked.
        factor = self.pipe.vae_scale_factor
        render_width = math.ceil(r.width / factor) * factor
        render_height = math.ceil(r.height / factor) * factor
        generator = torch.Generator(device="cpu").manual_seed(r.seed)
        if cached_prompt and r.guidance > 1:
            prompt_embeds, negative_embeds = self.prompt_embeddings(r.prompt, r.negative_prompt)
            text = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
        else:
            text = dict(prompt=r.prompt, negative_prompt=r.negative_prompt or None)
        common = dict(num_inference_steps=r.steps, guidance_scale=r.guidance, **text)

        if r.init_image is None:
            # The whole set's initial noise, drawn as one batched call would draw it: any batch size, same images.
            latents = randn_tensor((r.num_images, self.pipe.unet.config.in_channels, render_height // factor,
                                    render_width // factor), generator=generator, device=self.pipe.device,
                                   dtype=self.pipe.unet.dtype)
            batch = self.batch_size or r.num_images
            images: list[Image.Image] = []
            for start in range(0, r.num_images, batch):
                chunk = latents[start:start + batch]
                drawn = self.pipe(height=render_height, width=render_width, num_images_per_prompt=len(chunk),
                                  latents=chunk, **common).images
                drawn = [_exact_size(image, r.width, r.height) for image in drawn]
                if on_images is not None:
                    on_images(drawn)
                images.extend(drawn)
            return images

        common.update(num_images_per_prompt=r.num_images, generator=generator)
        # img2img and inpainting run only the last `strength` share of the schedule; make that at least one step.
        common["num_inference_steps"] = max(r.steps, math.ceil(1 / r.strength))
        init_exact = r.init_image.convert("RGB").resize((r.width, r.height), Image.Resampling.LANCZOS)
        init_for_model = init_exact.resize((render_width, render_height), Image.Resampling.LANCZOS)
        if r.mask_image is None:
            images = self._img2img()(image=init_for_model, strength=r.strength, **common).images
            images = [_exact_size(image, r.width, r.height) for image in images]
        else:
            mask_exact = r.mask_image.convert("L").resize((r.width, r.height), Image.Resampling.NEAREST)
            mask_for_model = mask_exact.resize((render_width, render_height), Image.Resampling.NEAREST)
            images = self._inpaint()(
                image=init_for_model, mask_image=mask_for_model, height=render_height, width=render_width,
                strength=r.strength, **common,
            ).images
            images = [Image.composite(_exact_size(image, r.width, r.height), init_exact, mask_exact)
                      for image in images]
        if on_images is not None:
            on_images(images)
        return images

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


def render_template_set(renderer: Renderer, lora: bytes, request: RenderRequest, *,
                        on_images: Callable[[list[Image.Image]], None] | None = None) -> list[Image.Image]:
    """Render one template set for a LoRA: ``request.num_images`` candidates, in draw order."""
    return renderer.render_set(lora, request, on_images=on_images)


def _exact_size(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
