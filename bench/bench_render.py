"""Seconds per render set on the tiny model, and the share poster's render time.

Run: .venv/bin/python bench/bench_render.py [--steps N] [--repeats N] [--template ID]
A render set is what the render job does for one template: draw the template's candidates through Renderer
(user LoRA swapped in and out), rank them by likeness (face detection on every candidate) and label the kept
ones. The baseline, measured in the same run, is one plain pipeline call for one image at the same size and
steps (no LoRA, no ranking, no label); the ratio says what a set costs in plain-image units.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from models.ranking import rank_candidates  # noqa: E402
from portraits.catalog import fit_output_size, load_catalog  # noqa: E402
from models.posters import make_poster  # noqa: E402
from portraits.services import TEMPLATES_DIR  # noqa: E402
from models.faces import FaceAnalyzer  # noqa: E402
from models.labels import find_cjk_font, label_image  # noqa: E402
from models.pipeline import build_tiny_pipeline  # noqa: E402
from models.render import Renderer  # noqa: E402
from models.train import TrainConfig, train_lora  # noqa: E402


def timed(action, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (tests use 2, RENDER_MAX_STEPS)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--template", default="urban_neon_night")
    args = parser.parse_args()

    catalog = load_catalog(TEMPLATES_DIR)
    template = catalog.get(args.template)
    font = find_cjk_font()
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    renderer = Renderer(pipe)
    analyzer = FaceAnalyzer()
    lora = train_lora(pipe, [Image.new("RGB", (64, 64), (150, 120, 100))], "sks person",
                      TrainConfig(rank=8, steps=1, resolution=64))
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(catalog.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(catalog.asset_path(template.mask)).convert("L")
    prompt = template.prompt_for("sks person")

    def baseline():
        return pipe(prompt=prompt, negative_prompt=template.negative_prompt or None, num_inference_steps=args.steps,
                    guidance_scale=template.guidance, width=template.width, height=template.height).images[0]

    def render_set():
        drawn = renderer.render(lora=lora, adapter_name="bench_user", prompt=prompt,
                                negative_prompt=template.negative_prompt, num_images=template.candidates,
                                steps=args.steps, guidance=template.guidance, width=template.width,
                                height=template.height, seed=1, lora_scale=template.identity_strength,
                                init_image=init_image, mask_image=mask)
        if template.output_size:
            drawn = [fit_output_size(image, template.output_size) for image in drawn]
        kept = rank_candidates(drawn, None, analyzer, template.images_to_keep, require_face=False)
        return [label_image(c.image, content_id=f"AIGC-BENCH-{c.index}", provider="bench", font_path=font)
                for c in kept]

    baseline()  # warm-up: first calls allocate and pick kernels
    baseline_s, _ = timed(baseline, args.repeats)
    set_s, labelled = timed(render_set, args.repeats)
    portrait = Image.open(io.BytesIO(labelled[0]))
    code = io.BytesIO()
    Image.new("RGB", (280, 280), (30, 30, 30)).save(code, format="PNG")  # stands in for WeChat's mini-program code
    poster_s, poster = timed(lambda: make_poster(portrait, caption_zh=template.caption_zh,
                                                 app_code_png=code.getvalue(), font_path=font,
                                                 portrait_labelled=True, png_text={"AIGC": "{}"}), args.repeats)
    print(f"template {template.id}: {template.width}x{template.height}, {template.candidates} candidates, "
          f"keep {template.images_to_keep}, {args.steps} steps, guidance {template.guidance}")
    print(f"baseline  plain pipeline, 1 image           {baseline_s:8.2f} s")
    print(f"render set ({template.candidates} candidates + rank + label)   {set_s:8.2f} s   "
          f"ratio {set_s / baseline_s:5.2f}x baseline, {set_s / template.candidates / baseline_s:5.2f}x per candidate")
    print(f"poster    750x1334 PNG ({len(poster)} bytes)  {poster_s:8.3f} s   ratio {poster_s / baseline_s:5.3f}x baseline")


if __name__ == "__main__":
    main()
