"""A render set's time per image against a plain pipeline call per image, same model, same run.

Run: .venv/bin/python bench/bench_render.py [--steps N] [--repeats N] [--template ID] [--width W --height H]
A render set is what the render job does for one template: draw the template's candidates through Renderer (the
user's LoRA copied into the resident slot, the template's prompt embeddings cached, candidates in batches of
--batch), rank them by likeness on the judging thread while the next batch samples (face detection on every
candidate) and label the kept ones as JPEG (XMP + EXIF + visible label). The baseline is one plain pipeline call for
one image at the same size and steps (no LoRA, no ranking, no label); "ratio" is baseline seconds per image over the
set's seconds per image (> 1: the set is cheaper per image). The seed's render set (LoRA injected and removed per
call, ranking after sampling, PNG labels) is measured too, as "per-call".

Pixels are asserted identical where the math is the same: the resident slot draws what the LoRA loaded the
ordinary diffusers way draws, and a scale-0 render draws what the plain pipeline draws.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.faces import FaceAnalyzer  # noqa: E402
from models.labels import find_cjk_font, label_image  # noqa: E402
from models.pipeline import build_tiny_pipeline  # noqa: E402
from models.posters import make_poster  # noqa: E402
from models.ranking import CandidateJudge, rank_candidates, rank_scored  # noqa: E402
from models.render import Renderer, RenderRequest, render_template_set  # noqa: E402
from models.train import TrainConfig, lora_state_dict_from_bytes, train_lora  # noqa: E402
from portraits.catalog import fit_output_size, load_catalog  # noqa: E402
from portraits.services import TEMPLATES_DIR  # noqa: E402


def timed(action, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def timed_in_turn(actions: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds of each action, run in turn round after round, so a load that drifts (a shared machine)
    weighs on all of them alike."""
    seconds = {name: [] for name in actions}
    results = {}
    for _ in range(repeats):
        for name, action in actions.items():
            started = time.perf_counter()
            results[name] = action()
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(seconds[name]), results[name]) for name in actions}


def same_pixels(first, second) -> bool:
    return len(first) == len(second) and all(np.array_equal(np.asarray(a), np.asarray(b))
                                             for a, b in zip(first, second))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (tests use 2, RENDER_MAX_STEPS)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--template", default="urban_neon_night")
    parser.add_argument("--width", type=int, help="override the template's width (a smaller run)")
    parser.add_argument("--height", type=int, help="override the template's height")
    parser.add_argument("--batch", type=int, default=3, help="candidates per sampling call (RENDER_BATCH_SIZE)")
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRA for the sampling loop (RENDER_FUSE_LORA)")
    args = parser.parse_args()

    catalog = load_catalog(TEMPLATES_DIR)
    template = catalog.get(args.template)
    width, height = args.width or template.width, args.height or template.height
    font = find_cjk_font()
    # One pipeline per contender, the same weights (the tiny model is built from a seed): no contender runs with
    # another's adapters (or their disabled wrappers) on its UNet.
    pipe, per_call_pipe, ours_pipe = (build_tiny_pipeline(seed=0) for _ in range(3))
    analyzer = FaceAnalyzer()
    judge = CandidateJudge(FaceAnalyzer)
    lora = train_lora(pipe, [Image.new("RGB", (64, 64), (150, 120, 100))], "sks person",
                      TrainConfig(rank=8, steps=1, resolution=64))
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(catalog.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(catalog.asset_path(template.mask)).convert("L")
    request = RenderRequest(prompt=template.prompt_for("sks person"), negative_prompt=template.negative_prompt,
                            num_images=template.candidates, steps=args.steps, guidance=template.guidance,
                            width=width, height=height, seed=1, lora_scale=template.identity_strength,
                            init_image=init_image, mask_image=mask)
    renderer = Renderer(ours_pipe, batch_size=args.batch, fuse=args.fuse)

    def fit(images):
        return [fit_output_size(image, template.output_size) for image in images] if template.output_size else images

    def plain(num_images: int, on=pipe):
        return on(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                    num_images_per_prompt=num_images, num_inference_steps=args.steps,
                    guidance_scale=request.guidance, width=width, height=height,
                    generator=torch.Generator(device="cpu").manual_seed(request.seed)).images

    def per_call_lora(num_images: int):
        per_call_pipe.load_lora_weights(lora_state_dict_from_bytes(lora), adapter_name="per_call")
        per_call_pipe.set_adapters(["per_call"], adapter_weights=[request.lora_scale])
        try:
            return plain(num_images, on=per_call_pipe)
        finally:
            per_call_pipe.unload_lora_weights()

    def per_call_set():
        drawn = fit(per_call_lora(request.num_images))
        kept = rank_candidates(drawn, None, analyzer, template.images_to_keep, require_face=False)
        return [label_image(c.image, content_id=f"AIGC-BENCH-{c.index}", provider="bench", font_path=font)
                for c in kept]

    def render_set():
        drawn, judging = [], []

        def judge_batch(batch):
            fitted = fit(batch)
            drawn.extend(fitted)
            judging.append(judge.score(fitted, None))

        render_template_set(renderer, lora, request, on_images=judge_batch)
        scores = [score for future in judging for score in future.result()]
        kept = rank_scored(drawn, scores, template.images_to_keep, require_face=False)
        return [label_image(c.image, content_id=f"AIGC-BENCH-{c.index}", provider="bench", font_path=font,
                            fmt="JPEG") for c in kept]

    # Identical pixels where the math is the same (text-to-image; one batch, as the reference draws it).
    if init_image is None and not args.fuse:
        whole_batch = Renderer(build_tiny_pipeline(seed=0))
        reference = per_call_lora(request.num_images)
        assert same_pixels(render_template_set(whole_batch, lora, request), reference), "slot != per-call LoRA"
        assert same_pixels(render_template_set(whole_batch, lora, RenderRequest(**{**request.__dict__,
                                                                                   "lora_scale": 0.0})),
                           plain(request.num_images)), "scale 0 != plain pipeline"
        print("pixels: resident slot == LoRA loaded per call; scale 0 == plain pipeline (asserted)")

    plain(1)  # warm-up: first calls allocate and pick kernels
    per_call_set()
    render_set()  # warm-up: slot injected, prompt encoded, the judge's analyzer built
    measured = timed_in_turn({"baseline": lambda: plain(1), "per_call": per_call_set, "ours": render_set},
                             args.repeats)
    (baseline_s, _), (per_call_s, _), (set_s, labelled) = measured["baseline"], measured["per_call"], measured["ours"]
    portrait = Image.open(io.BytesIO(labelled[0]))
    code = io.BytesIO()
    Image.new("RGB", (280, 280), (30, 30, 30)).save(code, format="PNG")  # stands in for WeChat's mini-program code
    poster_s, poster = timed(lambda: make_poster(portrait, caption_zh=template.caption_zh,
                                                 app_code_png=code.getvalue(), font_path=font,
                                                 portrait_labelled=True, png_text={"AIGC": "{}"}), args.repeats)
    count = template.candidates
    print(f"template {template.id}: {width}x{height}, {count} candidates in batches of {args.batch or count}, "
          f"keep {template.images_to_keep}, {args.steps} steps, guidance {template.guidance}, fuse {args.fuse}")
    print(f"baseline   plain pipeline, 1 image per call     {baseline_s:8.2f} s per image")
    print(f"per-call   seed's set (inject/remove, PNG)      {per_call_s / count:8.2f} s per image   "
          f"ratio {baseline_s / (per_call_s / count):5.2f}x")
    print(f"render set resident slot + judge thread + JPEG  {set_s / count:8.2f} s per image   "
          f"ratio {baseline_s / (set_s / count):5.2f}x   (swap {renderer.swap_seconds() * 1000:.0f} ms)")
    print(f"poster     750x1334 PNG ({len(poster)} bytes)     {poster_s:8.3f} s")
    judge.close()


if __name__ == "__main__":
    main()
