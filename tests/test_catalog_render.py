"""Every template of the shipped catalog renders on the tiny model at its own size (through Renderer directly).

One candidate and one step per template keep this fast; every template's prompt, negative prompt, guidance,
size and inpainting inputs are exercised.
"""
from __future__ import annotations

import pytest
from PIL import Image

from miniapp_api.catalog import fit_output_size, load_catalog
from miniapp_api.services import TEMPLATES_DIR

CATALOG = load_catalog(TEMPLATES_DIR)


@pytest.fixture(scope="module")
def renderer(tiny_pipeline):
    from models.render import Renderer

    return Renderer(tiny_pipeline)


@pytest.fixture(scope="module")
def user_lora(tiny_pipeline) -> bytes:
    from models.train import TrainConfig, train_lora

    return train_lora(tiny_pipeline, [Image.new("RGB", (64, 64), (150, 120, 100))], "sks person",
                      TrainConfig(rank=4, steps=1, resolution=64))


@pytest.mark.parametrize("template", list(CATALOG), ids=lambda t: t.id)
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
