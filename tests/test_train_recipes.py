"""The training recipes converge alike, and a loss that stops being finite still fails the training.

Both recipes see the same 64 images on the tiny random model: the loss curve falls in each, and each adapter lowers
the denoising loss on a fixed held-out set of (image, noise, timestep) draws by a like amount. The tiny model needs a
larger step to move in a CPU-sized run, so both learning rates are raised by the same factor: what a recipe chooses
(its batch and the ratio of its learning rate to the standard one) is what is compared.
"""
import math
import typing
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageDraw

from jobs.training import _config
from models.pipeline import build_tiny_pipeline
from models.train import (LOSS_CHECK_EVERY, TRAIN_RECIPES, TrainConfig, TrainingError, _encode_latent_distribution,
                          lora_state_dict_from_bytes, train_lora)
from portraits.config import Settings

torch.set_num_threads(2)

IMAGES_SEEN = 64
TINY_LEARNING_RATE_BOOST = 100
CAPTION = "sks person"
# The batched recipe's held-out improvement is within this factor of the standard one's.
RECIPES_AGREE_WITHIN = 2.0


def _portraits(count=4, size=64):
    """Smooth head-and-shoulders shapes: something a LoRA can learn in a few dozen steps (noise is not)."""
    photos = []
    for index in range(count):
        image = Image.new("RGB", (size, size), (40 + 40 * index, 90, 160 - 30 * index))
        draw = ImageDraw.Draw(image)
        draw.ellipse((12 + 2 * index, 8, 52 - 2 * index, 56), fill=(220, 180, 150))
        draw.rectangle((0, 48, size, size), fill=(30, 30, 90 + 30 * index))
        photos.append(image)
    return photos


def _held_out_loss(pipe, photos, lora: bytes | None) -> float:
    """Mean denoising loss over 32 fixed draws spread across the timesteps, with the adapter loaded if given."""
    means, _ = _encode_latent_distribution(pipe, photos, 64)
    latents = means * pipe.vae.config.scaling_factor
    draws = 32
    picks = torch.arange(draws) % len(photos)
    timesteps = torch.linspace(20, 980, draws).long()
    noise = torch.randn((draws, *latents.shape[1:]), generator=torch.Generator().manual_seed(123))
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents[picks], noise, timesteps)
    prompt_embeds, _ = pipe.encode_prompt(CAPTION, "cpu", 1, False)
    if lora is not None:
        pipe.load_lora_weights(lora_state_dict_from_bytes(lora), adapter_name="held_out")
    try:
        with torch.no_grad():
            prediction = pipe.unet(noisy, timesteps, prompt_embeds.expand(draws, -1, -1)).sample
    finally:
        if lora is not None:
            pipe.unload_lora_weights()
    return F.mse_loss(prediction, noise).item()


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def runs(pipe):
    photos = _portraits()
    results = {"base": _held_out_loss(pipe, photos, None)}
    for recipe in TRAIN_RECIPES:
        config = TrainConfig.for_recipe(recipe, steps=IMAGES_SEEN, resolution=64, rank=4, seed=3)
        config = replace(config, learning_rate=config.learning_rate * TINY_LEARNING_RATE_BOOST)
        losses = []
        lora = train_lora(pipe, photos, CAPTION, config, on_loss=lambda step, loss: losses.append(loss))
        results[recipe] = dict(losses=losses, held_out=_held_out_loss(pipe, photos, lora), config=config)
    return results


def _quarter_means(losses):
    quarter = len(losses) // 4
    return np.mean(losses[:quarter]), np.mean(losses[-quarter:])


def test_the_batched_recipe_sees_the_same_images_in_a_quarter_of_the_steps(runs):
    assert len(runs["standard"]["losses"]) == IMAGES_SEEN
    assert len(runs["batched"]["losses"]) == IMAGES_SEEN // 4
    assert runs["batched"]["config"].batch_size == 4
    assert TrainConfig.for_recipe("batched").total_steps(21) == 200  # 800 images seen, the standard's steps


@pytest.mark.parametrize("recipe", sorted(TRAIN_RECIPES))
def test_each_recipe_lowers_its_loss_curve_and_the_held_out_loss(runs, recipe):
    first, last = _quarter_means(runs[recipe]["losses"])
    assert last < first
    assert runs[recipe]["held_out"] < runs["base"] * 0.98


def test_the_recipes_end_alike(runs):
    standard_gain = runs["base"] - runs["standard"]["held_out"]
    batched_gain = runs["base"] - runs["batched"]["held_out"]
    assert 1 / RECIPES_AGREE_WITHIN < batched_gain / standard_gain < RECIPES_AGREE_WITHIN
    _, standard_last = _quarter_means(runs["standard"]["losses"])
    _, batched_last = _quarter_means(runs["batched"]["losses"])
    assert abs(batched_last / standard_last - 1) < 0.1


def test_a_loss_that_stops_being_finite_fails_within_one_check_window_and_leaves_the_base_clean(pipe):
    steps_done, reported = [], []
    with pytest.raises(TrainingError) as error:
        train_lora(pipe, _portraits(2), CAPTION, TrainConfig(steps=2 * LOSS_CHECK_EVERY, learning_rate=math.inf,
                                                             resolution=64, rank=4),
                   progress=lambda step, total: steps_done.append(step),
                   on_loss=lambda step, loss: reported.append(step))
    assert error.value.reason == "loss_not_finite"
    assert "at step 2" in str(error.value)  # step 1 ran on the initial weights; its update made them infinite
    assert reported == [1]
    assert len(steps_done) < LOSS_CHECK_EVERY
    assert not any(isinstance(module, BaseTunerLayer) for module in pipe.unet.modules())


def test_a_compiled_training_follows_the_eager_one(pipe):
    """Compiling changes how the UNet runs, not what it computes (dynamo's eager backend keeps this CPU-cheap)."""
    config = TrainConfig(steps=3, resolution=64, rank=4, seed=5, learning_rate=1e-2)
    eager, compiled = [], []
    train_lora(pipe, _portraits(2), CAPTION, config, on_loss=lambda step, loss: eager.append(loss))
    train_lora(pipe, _portraits(2), CAPTION, replace(config, compile_mode="default", compile_backend="eager"),
               on_loss=lambda step, loss: compiled.append(loss))
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert not any(isinstance(module, BaseTunerLayer) for module in pipe.unet.modules())


def test_the_settings_name_every_recipe_and_reach_the_training_config(tmp_path):
    assert set(typing.get_args(Settings.model_fields["train_recipe"].annotation)) == set(TRAIN_RECIPES)
    environment = {"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1"}
    avatar = {"_id": "avatar-1"}
    settings = Settings.from_env({**environment, "TRAIN_RECIPE": "batched", "TRAIN_COMPILE": "reduce-overhead"})
    config = _config(settings, avatar)
    assert (config.batch_size, config.learning_rate) == (4, TRAIN_RECIPES["batched"]["learning_rate"])
    assert config.compile_mode == "reduce-overhead"
    default = _config(Settings.from_env(environment), avatar)
    assert (default.batch_size, default.compile_mode) == (1, None)


def test_an_unknown_recipe_is_refused_with_its_code():
    with pytest.raises(TrainingError) as error:
        TrainConfig.for_recipe("huge")
    assert error.value.reason == "unknown_train_recipe"
