"""bench/bench_gpu.py's step counter, on the tiny model: what it says one step of each loop costs.

The counted FLOPs are the matrix work (linear layers, convolutions, attention); the two loops run the same UNet on
the same shapes, so a steady step of the reference must cost exactly one VAE encode and one text encode more than
ours. This fails if our loop starts encoding per step again, or if the reference stops doing what the DreamBooth-LoRA
example does.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_gpu import CAPTION, CPU_ATTENTION_FLOPS, count_step_costs, random_photos
from models.pipeline import build_tiny_pipeline
from models.train import _to_pixel_tensor

torch.set_num_threads(2)
RESOLUTION = 64


def _encode_once_flops(pipe, image) -> int:
    pixels = _to_pixel_tensor(image, RESOLUTION).unsqueeze(0)
    ids = pipe.tokenizer(CAPTION, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        pipe.vae.encode(pixels).latent_dist.sample()
        pipe.text_encoder(ids)
    return counter.get_total_flops()


def test_a_reference_step_costs_one_vae_and_one_text_encode_more_than_ours():
    pipe = build_tiny_pipeline(seed=0)
    images = random_photos(2, RESOLUTION)

    ours, reference = count_step_costs(pipe, images, RESOLUTION, rank=4, device="cpu")

    encodes = _encode_once_flops(pipe, images[0])
    assert encodes > 0 and ours.flops > 0
    assert reference.flops - ours.flops == encodes
    assert ours.launches < reference.launches
    assert not getattr(pipe.unet, "peft_config", None)  # both loops took their adapters off again
