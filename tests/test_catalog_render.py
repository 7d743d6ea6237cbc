"""The shipped catalog renders on the tiny model (through Renderer directly).

Templates differ in what the renderer does with them by size, mode (text-to-image or inpainting an init image),
style LoRA and output size; one template of each distinct combination is rendered (one candidate, one step), and
every template's prompt and negative prompt go through the text encoder.
"""
from __future__ import annotations

import pytest
from PIL import Image

from portraits.catalog import fit_output_size, load_catalog
from portraits.services import TEMPLATES_DIR

CATALOG = load_catalog(TEMPLATES_DIR)


def render_shape(template) -> tuple:
    return (template.width, template.height, bool(template.init_image), bool(template.style_lora),
            template.output_size)


ONE_PER_SHAPE = list({render_shape(t): t for t in reversed(list(CATALOG))}.values())


@pytest.fixture(scope="module")
def renderer(tiny_pipeline):
    from models.render import Renderer

    return Renderer(tiny_pipeline)


@pytest.fixture(scope="module")
def user_lora(tiny_pipeline) -> bytes:
    from models.render import release_lora_slots
    from models.train import TrainConfig, train_lora

    release_lora_slots(tiny_pipeline)  # renders earlier in the session leave resident slots; training needs none
    return train_lora(tiny_pipeline, [Image.new("RGB", (64, 64), (150, 120, 100))], "sks person",
                      TrainConfig(rank=4, steps=1, resolution=64))


def test_every_template_prompt_goes_through_the_text_encoder(tiny_pipeline):
    for template in CATALOG:
        for text in (template.prompt_for("sks person"), template.negative_prompt):
            embeds, _ = tiny_pipeline.encode_prompt(text, "cpu", 1, False)
            assert embeds.shape[0] == 1, template.id


def test_the_rendered_sample_covers_every_shape_in_the_catalog():
    assert {render_shape(t) for t in ONE_PER_SHAPE} == {render_shape(t) for t in CATALOG}
    assert any(t.init_image for t in ONE_PER_SHAPE) and any(not t.init_image for t in ONE_PER_SHAPE)


@pytest.mark.parametrize("template", ONE_PER_SHAPE, ids=lambda t: t.id)
def test_template_renders_at_its_size(template, renderer, user_lora):
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(CATALOG.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(CATALOG.asset_path(template.mask)).convert("L")
    images = renderer.render(
        lora=user_lora, adapter_name="catalog_check", prompt=template.prompt_for("sks person"),
        negative_prompt=template.negative_prompt, num_images=1, steps=1, guidance=template.guidance,
        width=template.width, height=template.height, seed=1, lora_scale=template.identity_strength,
        style_lora=CATALOG.asset_path(template.style_lora).read_bytes() if template.style_lora else None,
        style_scale=template.style_strength, init_image=init_image, mask_image=mask,
    )
    assert len(images) == 1
    assert images[0].size == (template.width, template.height)
    if template.output_size:
        assert fit_output_size(images[0], template.output_size).size == template.output_size
    if mask is not None:
        # Outside the mask the composition is the template's own init image, pixel for pixel.
        outside_replaced = Image.composite(images[0], init_image, mask)
        assert list(outside_replaced.getdata()) == list(images[0].convert("RGB").getdata())
