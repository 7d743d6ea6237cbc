"""An album image's time against a one-person pack image's, same model, same size, same run.

Run: .venv/bin/python bench/bench_album.py [--steps N] [--repeats N] [--candidates N] [--album ID] [--single ID]
A pack image is what the render job does for one slot of a pack's batch: --candidates candidates drawn through
Renderer with the user's LoRA in the resident slot, each batch scored for likeness on the judging thread, the best
labelled as JPEG. An album image is the same for one slot of an album's batch (models.album): --candidates scenes
on the base weights, every face region of each inpainted with its owner's LoRA, each candidate scored region by
region on the judging thread, the one whose worst face is best labelled. Both are drawn at the album template's
size (the one-person template's prompt, at that size), so the ratio is what the album's stages add: in sampling
alone about 1 + FACE_STRENGTH * (each face's window as a share of the picture, summed), plus per region a LoRA copy,
a VAE round trip of its window and a face scan.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from bench.bench_render import timed_in_turn  # noqa: E402
from models.album import FACE_STRENGTH, AlbumFace, draw_album, face_window  # noqa: E402
from models.faces import FaceAnalyzer  # noqa: E402
from models.labels import find_cjk_font, label_image  # noqa: E402
from models.pipeline import build_tiny_pipeline  # noqa: E402
from models.ranking import CandidateJudge, rank_album, rank_scored  # noqa: E402
from models.render import Renderer, RenderRequest  # noqa: E402
from models.train import TrainConfig, train_lora  # noqa: E402
from portraits.catalog import load_catalog  # noqa: E402
from portraits.services import TEMPLATES_DIR  # noqa: E402

MEMBER_COLOURS = [(150, 120, 100), (90, 110, 160), (170, 150, 90)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (tests use 1-2, RENDER_MAX_STEPS)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=2, help="candidates per image (PACK_CANDIDATES_PER_IMAGE)")
    parser.add_argument("--album", default="couple_city_night", help="an album template (couple or family)")
    parser.add_argument("--single", default="urban_neon_night", help="a one-person template")
    args = parser.parse_args()

    catalog = load_catalog(TEMPLATES_DIR)
    album, single = catalog.get(args.album), catalog.get(args.single)
    width, height = album.width, album.height
    font = find_cjk_font()
    pipe = build_tiny_pipeline(seed=0)
    # One LoRA per member, each trained a step on its own colour: distinct weights of a real LoRA's shape.
    loras = [train_lora(pipe, [Image.new("RGB", (64, 64), colour)], "sks person",
                        TrainConfig(rank=8, steps=1, resolution=64))
             for colour in MEMBER_COLOURS[:album.people]]
    renderer = Renderer(pipe)
    judge = CandidateJudge(FaceAnalyzer)

    def label(image):
        return label_image(image, content_id="bench", provider="bench", font_path=font, fmt="JPEG")

    pack_request = RenderRequest(prompt=single.prompt_for("sks woman"), negative_prompt=single.negative_prompt,
                                 num_images=args.candidates, steps=args.steps, guidance=single.guidance, width=width,
                                 height=height, seed=1, lora_scale=single.identity_strength)
    scene = RenderRequest(prompt=album.prompt_for(" and ".join(["a woman"] * album.people)),
                          negative_prompt=album.negative_prompt, num_images=args.candidates, steps=args.steps,
                          guidance=album.guidance, width=width, height=height, seed=1)
    faces = [AlbumFace(box=tuple(box), lora=lora, prompt=album.prompt_for("sks woman"),
                       lora_scale=album.identity_strength)
             for box, lora in zip(album.face_regions, loras)]
    regions = [(face.box, None) for face in faces]
    windows = [face_window((width, height), face.box) for face in faces]
    sampling_ratio = 1 + FACE_STRENGTH * sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows) / (width * height)

    def pack_image():
        drawn, judging = [], []

        def judge_batch(batch):
            drawn.extend(batch)
            judging.append(judge.score(batch, None))

        renderer.render_set(loras[0], pack_request, on_images=judge_batch)
        scores = [score for future in judging for score in future.result()]
        return label(rank_scored(drawn, scores, 1, require_face=False)[0].image)

    def album_image():
        drawn, judging = [], []

        def judge_candidate(image):
            drawn.append(image)
            judging.append(judge.score_regions([image], regions))

        draw_album(renderer, scene, faces, on_candidate=judge_candidate)
        scores = [score for future in judging for score in future.result()]
        return label(rank_album(drawn, scores, 1, require_face=False)[0].image)

    timed_in_turn({"pack": pack_image, "album": album_image}, 1)  # warm-up: pipelines built, prompts cached
    measured = timed_in_turn({"pack": pack_image, "album": album_image}, args.repeats)
    judge.close()
    pack_seconds, album_seconds = measured["pack"][0], measured["album"][0]
    print(f"album {album.id} ({album.people} people) vs pack {single.id}, {width}x{height}, {args.steps} steps, "
          f"{args.candidates} candidates per image, tiny model, median of {args.repeats}")
    print(f"pack image   {pack_seconds:.3f} s")
    print(f"album image  {album_seconds:.3f} s   ratio album/pack {album_seconds / pack_seconds:.2f} "
          f"(sampling alone would give about {sampling_ratio:.2f})")


if __name__ == "__main__":
    main()
