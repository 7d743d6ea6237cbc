"""The GPU check: our training and rendering against the plain diffusers reference, eager and compiled, one command.

    bench/gpu_check.sh                  # on a CUDA machine: SD1.5 architecture, random weights, under 8 minutes
    python bench/gpu_check.py --toy     # the tiny model, a few steps (tests/test_gpu_check.py runs this on CPU)

Without CUDA the toy size is chosen automatically. Nothing is downloaded: the models are built from configs with
random weights on the device. Phases, each printed with its wall time as it ends:

  training   50 steps at 512 px on 21 photos each: ours (models.train.train_lora) in the standard recipe eager and
             compiled, the batched recipe eager, and the reference loop (bench_gpu.reference_train: the DreamBooth-LoRA
             example's loop, encoding image and prompt every step) eager and compiled
  rendering  one render set (4 candidates, 25 steps, 512 px) through our public render call and through a plain
             pipeline call with the LoRA already loaded, eager and compiled (UNet forward compiled in place)

Then a report: ratios, steps/s, peak GPU memory per phase and the projected time of one avatar (21 photos, 800
images seen): the measured run (encoding, set-up, compile, 50 steps, export) plus the remaining steps at the steady
rate measured after the warm-up steps. The last line is the whole report as JSON. Any error, a phase that would
start after the time budget, or a missing field ends the check with a non-zero status.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_gpu import CAPTION, build_sd15, ours_train, random_photos, reference_train, sync  # noqa: E402
from models.pipeline import build_tiny_pipeline  # noqa: E402
from models.render import Renderer, release_lora_slots  # noqa: E402
from models.train import MAX_STEPS, TRAIN_RECIPES, TrainConfig, lora_state_dict_from_bytes  # noqa: E402

AVATAR_PHOTOS = 21
AVATAR_IMAGES_SEEN = MAX_STEPS  # min(200 × 21, 800)
RANK = 8
SIZES = {
    # photos, steps, warm-up steps, resolution, render steps, render candidates, compile backend, time budget
    "sd15": dict(photos=AVATAR_PHOTOS, steps=50, warmup=5, resolution=512, render_steps=25, candidates=4,
                 backend="inductor", budget_s=480),
    "toy": dict(photos=3, steps=3, warmup=1, resolution=64, render_steps=2, candidates=2, backend="eager",
                budget_s=math.inf),  # a shared CPU takes what it takes; the test's timeout bounds it
}
REPORT_FIELDS = ("device", "size", "training", "rendering", "ratios", "projected_avatar_s", "elapsed_s")


class CheckFailed(RuntimeError):
    pass


def render_ours(renderer: Renderer, lora: bytes, request: dict):
    """Our render set through models.render's public call (the one place to adapt when that API changes)."""
    return renderer.render(lora=lora, adapter_name="gpu_check_user", **request)


def render_plain(pipe, request: dict):
    """A plain pipeline call, the user's LoRA already loaded by the caller."""
    return pipe(request["prompt"], num_images_per_prompt=request["num_images"],
                num_inference_steps=request["steps"], guidance_scale=request["guidance"],
                height=request["height"], width=request["width"],
                generator=torch.Generator().manual_seed(request["seed"])).images


@contextmanager
def compiled_unet_forward(pipe, backend: str):
    """The UNet's forward compiled in place for a block (the module object stays, so LoRA loading keeps working)."""
    unet = pipe.unet
    unet.forward = torch.compile(unet.forward, backend=backend)
    try:
        yield
    finally:
        del unet.forward  # back to the class's forward


class Check:
    def __init__(self, device: str, size: str):
        self.device, self.size = device, size
        self.params = SIZES[size]
        self.started = time.perf_counter()
        self.report = {"device": device, "size": size, "training": {}, "rendering": {}, "skipped": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def phase(self, section: str, name: str, action):
        """Run one measured phase with its peak GPU memory; refuse to start one after the budget."""
        if self.elapsed() > self.params["budget_s"]:
            self.report["skipped"].append(f"{section}.{name}")
            print(f"SKIPPED {section}.{name}: {self.elapsed():.0f}s spent, budget {self.params['budget_s']}s",
                  flush=True)
            return None
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        phase_started = time.perf_counter()
        result = action()
        sync(self.device)
        result["wall_s"] = round(time.perf_counter() - phase_started, 2)
        result["peak_gpu_mib"] = (round(torch.cuda.max_memory_allocated() / 2**20)
                                  if self.device == "cuda" else None)
        self.report[section][name] = result
        print(f"{section:9s} {name:18s} " + "  ".join(f"{key} {value}" for key, value in result.items()), flush=True)
        return result


def _training_result(timing, images_per_step: int) -> dict:
    avatar_steps = math.ceil(AVATAR_IMAGES_SEEN / images_per_step)
    return {"steps_per_s": round(timing.steps_per_s, 3), "images_per_s": round(images_per_step * timing.steps_per_s, 3),
            "first_step_s": round(timing.first_step_s, 2), "projected_avatar_s": round(timing.projected_s(avatar_steps), 1)}


def _render_result(action, request: dict) -> dict:
    """A first call (allocations, kernel choice, compiles) and a second, timed one."""
    times = []
    for _ in range(2):
        sync(request["device"])
        started = time.perf_counter()
        images = action()
        sync(request["device"])
        times.append(time.perf_counter() - started)
    if len(images) != request["num_images"]:
        raise CheckFailed(f"a render set of {request['num_images']} gave {len(images)} images")
    return {"first_s": round(times[0], 2), "set_s": round(times[1], 3), "per_image_s": round(times[1] / len(images), 3)}


def run_check(device: str, size: str) -> dict:
    check = Check(device, size)
    params = check.params
    pipe = build_sd15(device) if size == "sd15" else build_tiny_pipeline(seed=0).to(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), {size} model built in "
          f"{check.elapsed():.1f}s", flush=True)
    photos = random_photos(params["photos"], params["resolution"])
    steps, warmup, resolution = params["steps"], params["warmup"], params["resolution"]
    loras = {}

    def ours(recipe: str, compile_mode: str | None):
        def action():
            images_per_step = TRAIN_RECIPES[recipe]["batch_size"]  # `steps` optimizer steps, whatever the batch
            config = TrainConfig.for_recipe(recipe, rank=RANK, steps=steps * images_per_step, resolution=resolution,
                                            seed=1, compile_mode=compile_mode, compile_backend=params["backend"])
            timing, loras[recipe, compile_mode] = ours_train(pipe, photos, config, device, warmup)
            return _training_result(timing, config.batch_size)
        return action

    def reference(compile_mode: str | None):
        return lambda: _training_result(reference_train(pipe, photos, steps, resolution, RANK, device, warmup,
                                                        compile_mode=compile_mode,
                                                        compile_backend=params["backend"]), 1)

    check.phase("training", "ours_eager", ours("standard", None))
    check.phase("training", "ours_batched_eager", ours("batched", None))
    check.phase("training", "reference_eager", reference(None))
    check.phase("training", "ours_compiled", ours("standard", "default"))
    check.phase("training", "reference_compiled", reference("default"))

    lora = loras["standard", None]
    request = dict(prompt=CAPTION + ", portrait", num_images=params["candidates"], steps=params["render_steps"],
                   guidance=7.0, width=resolution, height=resolution, seed=3)
    renderer = Renderer(pipe)
    measured = dict(request, device=device)
    check.phase("rendering", "ours_eager", lambda: _render_result(lambda: render_ours(renderer, lora, request),
                                                                  measured))
    with compiled_unet_forward(pipe, params["backend"]):
        check.phase("rendering", "ours_compiled",
                    lambda: _render_result(lambda: render_ours(renderer, lora, request), measured))
    release_lora_slots(pipe)  # the renderer's resident slot goes before the plain pipeline loads the LoRA its way
    pipe.load_lora_weights(lora_state_dict_from_bytes(lora), adapter_name="plain")
    try:
        check.phase("rendering", "plain_eager", lambda: _render_result(lambda: render_plain(pipe, request), measured))
        with compiled_unet_forward(pipe, params["backend"]):
            check.phase("rendering", "plain_compiled",
                        lambda: _render_result(lambda: render_plain(pipe, request), measured))
    finally:
        pipe.unload_lora_weights()
    return _summarise(check)


def _ratio(report: dict, section: str, ours: str, theirs: str, key: str, higher_is_better: bool):
    rows = report[section]
    if ours not in rows or theirs not in rows:
        return None
    value = rows[ours][key] / rows[theirs][key] if higher_is_better else rows[theirs][key] / rows[ours][key]
    return round(value, 2)


def _summarise(check: Check) -> dict:
    report = check.report
    report["ratios"] = {
        "train_per_step_eager": _ratio(report, "training", "ours_eager", "reference_eager", "steps_per_s", True),
        "train_per_step_compiled": _ratio(report, "training", "ours_compiled", "reference_compiled", "steps_per_s",
                                          True),
        "train_per_image_batched_vs_reference": _ratio(report, "training", "ours_batched_eager", "reference_eager",
                                                       "images_per_s", True),
        "train_compiled_vs_eager": _ratio(report, "training", "ours_compiled", "ours_eager", "steps_per_s", True),
        "render_per_image_eager": _ratio(report, "rendering", "ours_eager", "plain_eager", "per_image_s", False),
        "render_per_image_compiled": _ratio(report, "rendering", "ours_compiled", "plain_compiled", "per_image_s",
                                            False),
    }
    report["projected_avatar_s"] = {name: row["projected_avatar_s"] for name, row in report["training"].items()}
    report["elapsed_s"] = round(check.elapsed(), 1)
    return report


def print_report(report: dict) -> None:
    print(f"ratios (ours / reference, > 1 is faster): " +
          ", ".join(f"{name} {value}x" for name, value in report["ratios"].items()))
    print(f"projected time for one avatar ({AVATAR_PHOTOS} photos, {AVATAR_IMAGES_SEEN} images seen): " +
          ", ".join(f"{name} {seconds}s" for name, seconds in report["projected_avatar_s"].items()))
    print(f"elapsed {report['elapsed_s']}s")
    print("GPU_CHECK_JSON " + json.dumps(report, sort_keys=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the tiny model (automatic without CUDA)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "toy" if args.toy or device == "cpu" else "sd15"
    report = run_check(device, size)
    print_report(report)
    missing = [field for field in REPORT_FIELDS if field not in report]
    if missing or report["skipped"]:
        print(f"GPU CHECK FAILED: missing {missing}, skipped {report['skipped']}", file=sys.stderr)
        return 1
    if size == "sd15" and report["elapsed_s"] > SIZES["sd15"]["budget_s"]:
        print(f"GPU CHECK FAILED: took {report['elapsed_s']}s, over the {SIZES['sd15']['budget_s']}s budget",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
