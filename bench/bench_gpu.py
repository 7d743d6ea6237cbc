"""LoRA training steps/s and seconds per rendered image: ours vs the plain diffusers reference, same run.

    python bench/bench_gpu.py                       # tiny random-weight SD on whatever device there is (CPU here)
    python bench/bench_gpu.py --sd15                # the full SD1.5 architecture with random weights
    python bench/bench_gpu.py --sd15 --count        # also one step's FLOPs and operator launches, ours and theirs

On CUDA --sd15 takes 50 steps and compares renders too. On a CPU a step at SD1.5 size takes tens of seconds, so there
--sd15 defaults to 4 steps (1 warm-up, 3 timed) and training only (--no-train-only adds the 25-step renders, which
take hours): about 650 CPU-seconds, 6 minutes on 2 quiet cores. --batched adds the batched recipe there (batch 4,
an estimated 17 GB of RAM against 7.5 GB at batch 1, and 4 times the compute per step).

Ours: models.train.train_lora (latents and prompt embeddings encoded once, no host sync inside the loop) in both
recipes, and models.render.Renderer. The reference: a straightforward loop as in diffusers' DreamBooth-LoRA example
(VAE-encode the image and the prompt on every step, read the loss back every step for its log line) and a plain
pipeline call with the LoRA loaded. Same rank, learning rate, resolution, steps and seeds. No weights are
downloaded: both models are built from configs with random weights. bench/gpu_check.py runs the GPU-sized check.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from models.pipeline import build_tiny_pipeline, build_tiny_tokenizer, pick_device  # noqa: E402
from models.render import Renderer  # noqa: E402
from models.train import LORA_TARGET_MODULES, TrainConfig, _to_pixel_tensor, lora_state_dict_from_bytes  # noqa: E402
from models.train import train_lora  # noqa: E402

diffusers_logging.set_verbosity_error()
CAPTION = "a photo of sks woman"


def build_sd15(device: str) -> StableDiffusionPipeline:
    """SD1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights, initialised on `device`."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    with torch.device(device):  # random init where the weights will live: seconds on a GPU instead of a minute
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5's config
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    dtype = torch.float16 if device == "cuda" else torch.float32  # as models.pipeline.load_base_pipeline loads
    return pipe.to(device, dtype)


def random_photos(count: int, resolution: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(count)]


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class TrainTiming:
    steps: int
    total_s: float  # the whole run: encoding, adapter set-up, the steps, the export
    first_step_s: float  # from the start to the end of step 1: set-up plus any compile
    step_s: float  # steady seconds per step, timed after the warm-up steps

    @property
    def steps_per_s(self) -> float:
        return 1 / self.step_s

    def projected_s(self, total_steps: int) -> float:
        """The run as measured, plus the steps it did not take at the steady rate."""
        return self.total_s + (total_steps - self.steps) * self.step_s


def _timing(started: float, marks: dict[int, float], ended: float, steps: int, warmup: int) -> TrainTiming:
    return TrainTiming(steps=steps, total_s=ended - started, first_step_s=marks[1] - started,
                       step_s=(marks[steps] - marks[warmup]) / (steps - warmup))


def ours_train(pipe, images, config: TrainConfig, device, warmup: int) -> tuple[TrainTiming, bytes]:
    """train_lora, synchronised only where a time is read (after step 1, the warm-up and the last step)."""
    marks: dict[int, float] = {}

    def progress(step, total):
        if step in (1, warmup, total):
            sync(device)
            marks[step] = time.perf_counter()

    sync(device)
    started = time.perf_counter()
    weights = train_lora(pipe, images, CAPTION, config, progress=progress)
    sync(device)
    return _timing(started, marks, time.perf_counter(), config.total_steps(len(images)), warmup), weights


def reference_train(pipe, images, steps, resolution, rank, device, warmup: int,
                    compile_mode: str | None = None, compile_backend: str = "inductor",
                    progress=None) -> TrainTiming:
    """diffusers' DreamBooth-LoRA example, reduced to its loop: encode the image and the prompt every step and read
    the loss back for the log line (`loss.detach().item()`), as the example does."""
    started = time.perf_counter()
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGET_MODULES), adapter_name="reference")
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    denoise = torch.compile(unet, mode=compile_mode, backend=compile_backend) if compile_mode else unet
    pixels = torch.stack([_to_pixel_tensor(image, resolution) for image in images])
    ids = pipe.tokenizer(CAPTION, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    generator = torch.Generator().manual_seed(1)
    marks = {}
    unet.train()
    try:
        for step in range(1, steps + 1):
            pick = torch.randint(len(images), (1,), generator=generator)
            with torch.no_grad():
                latents = vae.encode(pixels[pick].to(device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            pred = denoise(noisy, timesteps, encoder_hidden_states).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.detach().item()  # the example's per-step log line
            marks[step] = time.perf_counter()
            if progress is not None:
                progress(step, steps)
    finally:
        unet.unload_lora()
        unet.eval()
    return _timing(started, marks, time.perf_counter(), steps, warmup)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def reference_extras_s(pipe, images, resolution, device) -> tuple[float, float]:
    """Seconds of the work the reference does on every step and ours does once per training: one image through the
    VAE encoder, the caption through the text encoder (each timed on its second call)."""
    pixels = _to_pixel_tensor(images[0], resolution).unsqueeze(0).to(device, pipe.vae.dtype)
    ids = pipe.tokenizer(CAPTION, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    timings = {}
    with torch.no_grad():
        for name, encode in (("vae", lambda: pipe.vae.encode(pixels).latent_dist.sample()),
                             ("text", lambda: pipe.text_encoder(ids)[0])):
            for _ in range(2):
                sync(device)
                started = time.perf_counter()
                encode()
                sync(device)
                timings[name] = time.perf_counter() - started
    return timings["vae"], timings["text"]


class AtenOpCounter(TorchDispatchMode):
    """Counts the aten operators a step dispatches, forward and backward: on a GPU each one that is not a view is
    about one kernel launch, which is what bounds a batch-1 step's host time."""

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.launches += 1
        return func(*args, **(kwargs or {}))


# torch's FLOP counter knows the CUDA attention kernels; these are the CPU one's (same arithmetic).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad_out, query, key, value),
}


@dataclass
class StepCost:
    flops: int
    launches: int


def count_step_costs(pipe, images, resolution, rank, device) -> tuple[StepCost, StepCost]:
    """FLOPs and operator launches of one steady training step (the second of two), ours and the reference's."""
    def counted(run):
        flops, ops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), AtenOpCounter()
        marks = {}

        def progress(step, total):
            marks[step] = StepCost(flops.get_total_flops(), ops.launches)

        with flops, ops:
            run(progress)
        return StepCost(marks[2].flops - marks[1].flops, marks[2].launches - marks[1].launches)

    ours = counted(lambda progress: train_lora(pipe, images, CAPTION, TrainConfig(rank=rank, steps=2,
                                                                                  resolution=resolution, seed=1),
                                               progress=progress))
    reference = counted(lambda progress: reference_train(pipe, images, 2, resolution, rank, device, 1,
                                                         progress=progress))
    return ours, reference


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="the full SD1.5 architecture (random weights)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 20 tiny; 50 sd15 on CUDA, 4 sd15 on a CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 tiny, 512 sd15")
    parser.add_argument("--render-steps", type=int, default=None, help="sampling steps (default 4 tiny, 25 sd15)")
    parser.add_argument("--images", type=int, default=2, help="images per render")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reference-first", action="store_true",
                        help="time the reference before ours (on a shared machine, a run in each order cancels a "
                             "load that drifts)")
    parser.add_argument("--count", action="store_true",
                        help="also count one step's FLOPs and operator launches, ours and the reference's (two more "
                             "steps of each, under torch's dispatch counters; not timed)")
    parser.add_argument("--train-only", action=argparse.BooleanOptionalAction, default=None,
                        help="skip the rendering comparison (default: on at SD1.5 size on a CPU)")
    parser.add_argument("--batched", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the batched recipe (default: on the tiny model and on CUDA; at SD1.5 size on "
                             "a CPU its batch of 4 needs over 16 GB)")
    args = parser.parse_args(argv)

    device = pick_device()
    sd15_on_cpu = args.sd15 and device != "cuda"
    steps = args.steps or (4 if sd15_on_cpu else 50 if args.sd15 else 20)
    if steps < 2:
        parser.error("--steps must be at least 2: one warm-up step and one timed")
    train_only = args.train_only if args.train_only is not None else sd15_on_cpu
    warmup = 1 if steps < 6 else 3
    resolution = args.resolution or (512 if args.sd15 else 64)
    render_steps = args.render_steps or (25 if args.sd15 else 4)
    built = time.perf_counter()
    pipe = build_sd15(device) if args.sd15 else build_tiny_pipeline(seed=0).to(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}); "
          f"{'SD1.5 architecture' if args.sd15 else 'tiny SD'} with random weights built in "
          f"{time.perf_counter() - built:.1f}s; {steps} steps at {resolution}px, rank {args.rank}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    images = random_photos(4, resolution)

    def run_ours():
        timing, weights = ours_train(pipe, images, TrainConfig(rank=args.rank, steps=steps, resolution=resolution,
                                                               seed=1), device, warmup)
        print(f"ours       {timing.step_s:8.3f} s/step, run {timing.total_s:.1f}s; peak RSS {peak_rss_gib():.1f} GiB",
              flush=True)
        return timing, weights

    def run_reference():
        timing = reference_train(pipe, images, steps, resolution, args.rank, device, warmup)
        print(f"reference  {timing.step_s:8.3f} s/step, run {timing.total_s:.1f}s; peak RSS {peak_rss_gib():.1f} GiB",
              flush=True)
        return timing

    if args.reference_first:
        reference = run_reference()
        ours, lora_a = run_ours()
    else:
        ours, lora_a = run_ours()
        reference = run_reference()
    print(f"training   ours {ours.steps_per_s:8.3f} steps/s   reference {reference.steps_per_s:8.3f} steps/s   "
          f"ratio {ours.steps_per_s / reference.steps_per_s:.2f}x per step (steady, after {warmup} warm-up steps)",
          flush=True)
    vae_s, text_s = reference_extras_s(pipe, images, resolution, device)
    print(f"reference's per-step extras: VAE encode {vae_s:.3f}s + text encoder {text_s:.3f}s = {vae_s + text_s:.3f}s; "
          f"the per-step ratio they alone allow: {(ours.step_s + vae_s + text_s) / ours.step_s:.2f}x", flush=True)
    if args.count:
        ours_cost, reference_cost = count_step_costs(pipe, images, resolution, args.rank, device)
        print(f"step cost  ours {ours_cost.flops / 1e9:.4g} GFLOP, {ours_cost.launches} operator launches   "
              f"reference {reference_cost.flops / 1e9:.4g} GFLOP, {reference_cost.launches} operator launches",
              flush=True)
    if args.batched if args.batched is not None else not sd15_on_cpu:
        # The batched recipe sees as many images in a quarter of the steps: compare it per image seen.
        config = TrainConfig.for_recipe("batched", rank=args.rank, steps=4 * steps, resolution=resolution, seed=1)
        batched, _ = ours_train(pipe, images, config, device, warmup)
        images_per_s = config.batch_size * batched.steps_per_s
        print(f"batched    ours {images_per_s:8.3f} images/s at batch {config.batch_size}   reference "
              f"{reference.steps_per_s:8.3f} images/s   ratio {images_per_s / reference.steps_per_s:.2f}x per image "
              f"seen; peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    if train_only:
        return
    _, lora_b = ours_train(pipe, images[:2], TrainConfig(rank=args.rank, steps=2, resolution=resolution), device, 1)

    renderer = Renderer(pipe)
    common = dict(prompt=CAPTION + ", portrait", num_images=args.images, steps=render_steps, guidance=7.0,
                  width=resolution, height=resolution)
    ours_times, swaps = [], []
    for seed, lora in enumerate([lora_a, lora_b, lora_a, lora_b]):  # a different user's LoRA every render
        sync(device)
        started = time.perf_counter()
        renderer.render(lora=lora, adapter_name=f"user_{seed}", seed=seed, **common)
        sync(device)
        ours_times.append((time.perf_counter() - started) / args.images)
        swaps.append(renderer.swap_seconds())
    pipe.load_lora_weights(lora_state_dict_from_bytes(lora_a), adapter_name="reference")
    ref_times = []
    for seed in range(4):
        sync(device)
        started = time.perf_counter()
        pipe(common["prompt"], num_images_per_prompt=args.images, num_inference_steps=render_steps,
             guidance_scale=7.0, height=resolution, width=resolution,
             generator=torch.Generator().manual_seed(seed))
        sync(device)
        ref_times.append((time.perf_counter() - started) / args.images)
    pipe.unload_lora_weights()
    ours_s, ref_s = statistics.median(ours_times[1:]), statistics.median(ref_times[1:])
    print(f"rendering  ours {ours_s:8.3f} s/image   reference {ref_s:8.3f} s/image   ratio {ref_s / ours_s:.2f}x "
          f"({render_steps} steps, {args.images} images per call; ours swaps the LoRA every render)")
    print(f"LoRA swap (load + unload, another user's adapter): median {statistics.median(swaps[1:]) * 1e3:.1f} ms, "
          f"max {max(swaps[1:]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
