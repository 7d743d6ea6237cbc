"""Real LoRA training and rendering on the tiny random pipeline (CPU, a few seconds)."""

import math

import numpy as np
import pytest
import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from diffusers import DDIMScheduler

from models.pipeline import build_tiny_pipeline, load_base_pipeline, pick_device
from models.render import IDENTITY_SLOT, Renderer, SlotMismatch, parse_unet_lora, release_lora_slots
from models.train import LORA_TARGET_MODULES, TrainConfig, TrainingError, lora_state_dict_from_bytes, train_lora

torch.set_num_threads(2)

TRAIN_STEPS = 6
# A high learning rate so a handful of steps moves the random tiny model visibly.
FAST_CONFIG = dict(resolution=64, learning_rate=1e-2, rank=4, seed=3)
RENDER = dict(prompt="a portrait of sks person", steps=3, width=128, height=128, seed=7)


def _photos(count=3, size=(96, 80)):
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")) for _ in range(count)]


def _base_render(pipe, *, prompt, steps, width, height, seed, guidance=7.0):
    """What Renderer renders, without any adapter."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    ).images[0]


def _pixels(image):
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(autouse=True)
def released_after(pipe):
    """Renders leave resident LoRA slots on the pipeline; the training tests need it without adapters."""
    yield
    release_lora_slots(pipe)


@pytest.fixture(scope="module")
def trained(pipe):
    unet_before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    grad_flags_before = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    calls, losses = [], []
    lora = train_lora(
        pipe,
        _photos(),
        "sks person",
        TrainConfig(steps=TRAIN_STEPS, **FAST_CONFIG),
        progress=lambda step, total: calls.append((step, total)),
        on_loss=lambda step, loss: losses.append(loss),
    )
    return dict(lora=lora, calls=calls, losses=losses, unet_before=unet_before, grad_flags_before=grad_flags_before)


def test_tiny_pipeline_shape(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None
    attention = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    for name in ("to_q", "to_k", "to_v"):
        assert isinstance(getattr(attention, name), torch.nn.Linear)
    assert isinstance(attention.to_out[0], torch.nn.Linear)
    ids = pipe.tokenizer("肖像 portrait").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_training_reports_progress_and_finite_loss(trained):
    assert trained["calls"] == [(step, TRAIN_STEPS) for step in range(1, TRAIN_STEPS + 1)]
    assert len(trained["losses"]) == TRAIN_STEPS
    assert all(math.isfinite(loss) for loss in trained["losses"])


def test_lora_bytes_are_diffusers_lora_for_the_four_attention_projections(trained):
    state = safetensors.torch.load(trained["lora"])
    assert state
    assert all(key.startswith("unet.") and ".lora." in key for key in state)
    for module in LORA_TARGET_MODULES:
        assert any(f".{module}.lora.down.weight" in key for key in state), module
        assert any(f".{module}.lora.up.weight" in key for key in state), module
    assert all(tensor.dtype == torch.float32 for tensor in state.values())
    assert any(tensor.abs().sum() > 0 for key, tensor in state.items() if ".lora.up." in key)


def test_training_leaves_base_unet_clean_and_unchanged(pipe, trained):
    after = pipe.unet.state_dict()
    assert after.keys() == trained["unet_before"].keys()
    for name, tensor in trained["unet_before"].items():
        assert torch.equal(after[name], tensor), name
    assert not getattr(pipe.unet, "peft_config", None)
    assert not any(isinstance(module, BaseTunerLayer) for module in pipe.unet.modules())
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == trained["grad_flags_before"]
    assert not pipe.unet.training


def _lora_render(pipe, lora, *, scale=1.0, num_images=1, prompt, steps, width, height, seed, guidance=7.0,
                 negative_prompt=""):
    """The reference: the LoRA loaded the ordinary diffusers way for one plain pipeline call, then removed (with
    every other adapter: diffusers' unload takes them all)."""
    release_lora_slots(pipe)
    pipe.load_lora_weights(lora_state_dict_from_bytes(lora), adapter_name="reference")
    pipe.set_adapters(["reference"], adapter_weights=[scale])
    try:
        return pipe(prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=num_images,
                    num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                    generator=torch.Generator(device="cpu").manual_seed(seed)).images
    finally:
        pipe.unload_lora_weights()


def _all_equal(first, second):
    return len(first) == len(second) and all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, second))


def _slot_weights(pipe):
    return [tensor for name, tensor in pipe.unet.state_dict().items() if IDENTITY_SLOT in name]


@pytest.fixture(scope="module")
def low_rank(pipe):
    release_lora_slots(pipe)
    return train_lora(pipe, _photos(2), "sks person", TrainConfig(steps=2, **{**FAST_CONFIG, "rank": 2, "seed": 5}))


@pytest.fixture(scope="module")
def high_rank(pipe):
    release_lora_slots(pipe)
    return train_lora(pipe, _photos(2), "sks person", TrainConfig(steps=2, **{**FAST_CONFIG, "rank": 8, "seed": 6}))


def test_lora_changes_the_render_and_the_slot_is_parked_afterwards(pipe, trained):
    release_lora_slots(pipe)
    base = _pixels(_base_render(pipe, **RENDER))
    renderer = Renderer(pipe)
    with_lora = _pixels(renderer.render(lora=trained["lora"], **RENDER)[0])
    assert np.abs(with_lora - base).mean() > 0.5

    # The slot stays resident, zeroed and disabled: a plain call on the same pipeline draws the base again.
    assert list(pipe.get_list_adapters()["unet"]) == [IDENTITY_SLOT]
    assert _slot_weights(pipe) and all(not tensor.any() for tensor in _slot_weights(pipe))
    assert np.array_equal(_pixels(_base_render(pipe, **RENDER)), base)
    assert renderer.swap_seconds() > 0


def test_resident_slot_draws_the_same_pixels_as_the_lora_loaded_per_call(pipe, trained):
    request = dict(RENDER, negative_prompt="blurry", num_images=2)
    reference = _lora_render(pipe, trained["lora"], scale=0.9, **request)
    renderer = Renderer(pipe)
    assert _all_equal(renderer.render(lora=trained["lora"], lora_scale=0.9, **request), reference)
    assert _all_equal(renderer.render(lora=trained["lora"], lora_scale=0.9, **request), reference)  # cached prompt
    assert renderer.identity_slot.reshapes == 1


def test_lora_scale_zero_renders_the_base(pipe, trained):
    base = pipe(RENDER["prompt"], num_images_per_prompt=2, num_inference_steps=RENDER["steps"], guidance_scale=7.0,
                width=RENDER["width"], height=RENDER["height"],
                generator=torch.Generator(device="cpu").manual_seed(RENDER["seed"])).images
    scaled_out = Renderer(pipe).render(lora=trained["lora"], lora_scale=0.0, num_images=2, **RENDER)
    assert _all_equal(scaled_out, base)


@pytest.fixture(scope="module")
def other_user(pipe):
    release_lora_slots(pipe)
    return train_lora(pipe, _photos(2), "sks person", TrainConfig(steps=2, **{**FAST_CONFIG, "seed": 11}))


@pytest.mark.parametrize("fuse", [False, True])
def test_user_b_after_user_a_draws_what_user_b_draws_on_a_fresh_pipeline(pipe, trained, other_user, fuse):
    request = dict(RENDER, num_images=2)
    fresh = Renderer(build_tiny_pipeline(seed=0), fuse=fuse).render(lora=other_user, **request)
    renderer = Renderer(pipe, fuse=fuse)
    user_a = renderer.render(lora=trained["lora"], **request)
    user_b = renderer.render(lora=other_user, **request)
    assert not _all_equal(user_a, user_b)
    assert _all_equal(user_b, fresh)
    assert np.array_equal(_pixels(_base_render(pipe, **RENDER)), _pixels(_base_render(build_tiny_pipeline(0), **RENDER)))


def test_fused_sampling_is_the_same_math(pipe, trained):
    unfused = Renderer(pipe).render(lora=trained["lora"], **RENDER)[0]
    fused = Renderer(pipe, fuse=True).render(lora=trained["lora"], **RENDER)[0]
    assert np.abs(_pixels(fused) - _pixels(unfused)).max() <= 2


def test_a_lower_rank_is_padded_into_the_slot_and_a_higher_rank_reshapes_it(pipe, trained, low_rank, high_rank):
    # The references first: loading and unloading a LoRA the ordinary way takes every adapter off, the slot's too.
    low_reference, high_reference = _lora_render(pipe, low_rank, **RENDER), _lora_render(pipe, high_rank, **RENDER)
    renderer = Renderer(pipe)
    renderer.render(lora=trained["lora"], **RENDER)  # rank 4
    padded = renderer.render(lora=low_rank, **RENDER)[0]
    assert (renderer.identity_slot.rank, renderer.identity_slot.reshapes) == (4, 1)
    assert np.abs(_pixels(padded) - _pixels(low_reference[0])).max() <= 2
    wider = renderer.render(lora=high_rank, **RENDER)
    assert (renderer.identity_slot.rank, renderer.identity_slot.reshapes) == (8, 2)
    assert _all_equal(wider, high_reference)


def test_a_lora_that_is_not_unet_only_is_refused_by_the_slot(trained):
    state = lora_state_dict_from_bytes(trained["lora"])
    assert parse_unet_lora(state)[1] == FAST_CONFIG["rank"]
    text_encoder = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": torch.zeros(4, 32)}
    with pytest.raises(SlotMismatch):
        parse_unet_lora({**state, **text_encoder})


def test_candidates_come_in_batches_with_the_whole_sets_noise(pipe, trained):
    request = dict(RENDER, num_images=3)
    batches = []
    whole = Renderer(pipe).render(lora=trained["lora"], **request)
    batched = Renderer(pipe, batch_size=2).render(lora=trained["lora"], on_images=lambda b: batches.append(len(b)),
                                                  **request)
    assert batches == [2, 1]
    # Same initial noise; a smaller batch only changes float rounding in the kernels.
    assert all(np.abs(_pixels(a) - _pixels(b)).max() <= 2 for a, b in zip(whole, batched))


def test_style_lora_is_mixed_in_and_removed(pipe, trained):
    release_lora_slots(pipe)  # training needs a UNet without adapters
    style = train_lora(pipe, _photos(2), "watercolor style", TrainConfig(steps=2, **{**FAST_CONFIG, "seed": 9}))
    renderer = Renderer(pipe)
    user_only = _pixels(renderer.render(lora=trained["lora"], adapter_name="user_c", **RENDER)[0])
    with_style = _pixels(
        renderer.render(lora=trained["lora"], adapter_name="user_c", style_lora=style, style_scale=1.0, **RENDER)[0]
    )
    assert not np.array_equal(user_only, with_style)
    assert np.array_equal(_pixels(renderer.render(lora=trained["lora"], **RENDER)[0]), user_only)


def test_render_sizes_and_determinism(pipe, trained):
    renderer = Renderer(pipe)
    request = dict(lora=trained["lora"], adapter_name="user_d", prompt="ID photo", steps=2, num_images=2)
    first = renderer.render(width=295, height=413, seed=5, **request)
    again = renderer.render(width=295, height=413, seed=5, **request)
    other_seed = renderer.render(width=295, height=413, seed=6, **request)
    assert [image.size for image in first] == [(295, 413), (295, 413)]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, again))
    assert not np.array_equal(_pixels(first[0]), _pixels(other_seed[0]))
    square = renderer.render(width=512, height=512, seed=5, **{**request, "num_images": 1})
    assert [image.size for image in square] == [(512, 512)]


def test_inpainting_keeps_pixels_outside_the_mask(pipe, trained):
    size = 128
    gradient = np.linspace(0, 255, size, dtype=np.float32)
    init = Image.fromarray(np.stack([np.tile(gradient, (size, 1))] * 3, axis=-1).astype("uint8"))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (32, 32, 96, 96))
    out = Renderer(pipe).render(
        lora=trained["lora"], adapter_name="user_e", prompt="wedding dress", steps=3, width=size, height=size,
        init_image=init, mask_image=mask, strength=0.9,
    )[0]
    assert out.size == (size, size)
    diff = np.abs(_pixels(out) - _pixels(init))
    outside = np.asarray(mask) == 0
    assert diff[outside].mean() <= 1.0
    assert diff[~outside].mean() > 5.0


def test_validation_keeps_the_best_checkpoint(pipe):
    scores = iter([0.1, 0.9, 0.2])
    seen = []

    def score(images):
        seen.append(len(images))
        return next(scores)

    config = dict(FAST_CONFIG, validation_prompts=("portrait of sks person",), validation_inference_steps=2)
    best = train_lora(pipe, _photos(), "sks person", TrainConfig(steps=3, validate_every=1, **config), score_validation=score)
    two_steps = train_lora(pipe, _photos(), "sks person", TrainConfig(steps=2, **config))
    three_steps = train_lora(pipe, _photos(), "sks person", TrainConfig(steps=3, **config))
    assert seen == [1, 1, 1]
    assert best == two_steps
    assert best != three_steps


def test_default_steps_follow_photo_count():
    assert TrainConfig().total_steps(3) == 600
    assert TrainConfig().total_steps(21) == 800
    assert TrainConfig(steps=5).total_steps(21) == 5


def test_training_without_images_is_refused(pipe):
    with pytest.raises(TrainingError) as error:
        train_lora(pipe, [], "sks person", TrainConfig(steps=1))
    assert error.value.reason == "no_training_images"


def test_a_base_model_with_an_unknown_prediction_type_is_refused_not_trained_as_epsilon(pipe):
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, prediction_type="sample")
    try:
        with pytest.raises(TrainingError) as error:
            train_lora(pipe, _photos(), "sks person", TrainConfig(steps=1))
    finally:
        pipe.scheduler = original
    assert error.value.reason == "unknown_prediction_type"
    assert not getattr(pipe.unet, "peft_config", None)  # refused before any adapter was added


def test_load_base_pipeline_reads_a_local_sd15_folder_offline(pipe, tmp_path):
    assert pick_device() in ("cpu", "cuda")
    assert load_base_pipeline(None, device="cpu").vae_scale_factor == 8
    pipe.save_pretrained(tmp_path)
    loaded = load_base_pipeline(str(tmp_path), device="cpu")
    assert loaded.unet.dtype == torch.float32
    assert loaded.safety_checker is None
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
