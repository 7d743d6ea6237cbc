"""Time judge_photo on one 4000x3000 phone-sized JPEG with a real face (issue 16's target: at most 2x the decode).

Run: .venv/bin/python bench/bench_intake.py [--repeats N]
Prints the median ms per photo, a baseline measured in the same run (decode + EXIF transpose of the same
file, nothing else) and the ratio of the two, in wall time and in CPU time (this process's, all threads): on a
shared machine the wall-time ratio follows the neighbours' load, the CPU-time ratio much less. Torch (the CNN check and the embedding) runs on one thread unless
--torch-threads says otherwise, and OpenCV on one thread with it (as FaceAnalyzer.use_one_core sets them in an intake
worker), so the ratio is the cost on one core, as the decode's is.

The judging and its baseline are timed call by call in turn (judge, decode, judge, ...), so a neighbour's burst lands on
both, and under a fixed allocator policy (glibc's mmap threshold at its 32 MB maximum, no trimming): left to its
dynamic threshold, glibc sometimes hands the full decode's 16 MB image blocks back to the kernel after every call, so
each decode page-faults its 48 MB in afresh (~11,600 minor faults, ~25 ms of system time: the decode twice as dear,
the ratio near 1) and sometimes not, by what the process allocated before. The minor faults per call are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from models.faces import CASCADE_GLANCE_FACE, FaceAnalyzer  # noqa: E402
from models.halvings import Halvings  # noqa: E402
from models.intake import IntakeLimits, _decode, _open, judge_photo, photo_hash  # noqa: E402
from models import sample_photos as photos  # noqa: E402


def phone_photo() -> bytes:
    """4000x3000 JPEG: the astronaut portrait upscaled to 2800 px inside a plain wall-coloured canvas."""
    return photos.encode(photos.phone_sized_image(), quality=90)


def full_decode(data: bytes) -> None:
    """The baseline: a full decode of the file and its EXIF transpose, nothing else."""
    image = Image.open(io.BytesIO(data))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)


def with_scales(analyzer: FaceAnalyzer, action):
    """``action()``'s result and the detection passes it ran: "cascade from N px" per pass of the face cascade (the
    smallest face width sought), "HOG at S" per dlib HOG scan (the scale of the decode it scanned)."""
    passes = []
    candidates, detect = analyzer._candidates, analyzer._cascade.detect
    analyzer._candidates = lambda image, scale: passes.append(f"HOG at {scale:.3f}") or candidates(image, scale)
    analyzer._cascade.detect = lambda rgb, smallest, largest=None, known=(): (
        passes.append(f"cascade from {smallest:.0f} px") or detect(rgb, smallest, largest, known))
    try:
        return action(), passes
    finally:
        analyzer._candidates, analyzer._cascade.detect = candidates, detect


def steady_allocator() -> str:
    """glibc's malloc with a fixed mmap threshold (its maximum, 32 MB) and no trimming, so freed memory is reused
    rather than returned to the kernel and faulted in again: neither side's cost then depends on what the process
    allocated before it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "allocator: not glibc, left as it is"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "allocator: glibc, mmap threshold 32 MB, no trim"
    return "allocator: glibc refused mallopt, left as it is"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass(frozen=True)
class Timing:
    wall_ms: float  # medians over the calls
    cpu_ms: float
    faults: float  # minor page faults per call


def in_turn(first, second, pairs: int) -> tuple[Timing, Timing]:
    """``first`` and ``second`` called in turn ``pairs`` times each: each one's median wall and CPU ms and its minor
    page faults per call."""
    wall, cpu, faults = ({first: [], second: []} for _ in range(3))
    for _ in range(pairs):
        for action in (first, second):
            start, start_cpu, start_faults = time.perf_counter(), time.process_time(), minor_faults()
            action()
            wall[action].append((time.perf_counter() - start) * 1000)
            cpu[action].append((time.process_time() - start_cpu) * 1000)
            faults[action].append(minor_faults() - start_faults)
    return tuple(Timing(statistics.median(wall[action]), statistics.median(cpu[action]),
                        statistics.fmean(faults[action])) for action in (first, second))


def median_ms(action, repeats: int) -> float:
    return median_wall_and_cpu_ms(action, repeats)[0]


def median_wall_and_cpu_ms(action, repeats: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        action()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    allocator = steady_allocator()
    torch.set_num_threads(args.torch_threads)
    if args.torch_threads == 1:
        cv2.setNumThreads(1)

    data = phone_photo()
    start = time.perf_counter()
    analyzer = FaceAnalyzer()
    load_ms = (time.perf_counter() - start) * 1000
    limits = IntakeLimits()

    verdict = judge_photo(data, role="front", accepted=[], limits=limits, analyzer=analyzer)
    assert verdict.accepted, verdict.reasons

    def baseline() -> None:
        full_decode(data)

    def judge() -> None:
        judge_photo(data, role="front", accepted=[], limits=limits, analyzer=analyzer)

    # Warm-up: a worker's first judgings run slower (oneDNN picks and packs its kernels; the caches fill).
    for _ in range(5):
        judge()
        baseline()
    judged, decoded = in_turn(judge, baseline, args.repeats)
    baseline_cpu_ms = decoded.cpu_ms
    print(f"photo: 4000x3000 JPEG, {len(data) / 1e6:.2f} MB; face fraction {verdict.scores['face_fraction']:.2f}; "
          f"analyzer load {load_ms:.0f} ms (once per process); {allocator}")
    print(f"baseline (full decode + exif_transpose): median {decoded.wall_ms:.1f} ms over {args.repeats} "
          f"(CPU {decoded.cpu_ms:.1f} ms, {decoded.faults:.0f} minor faults a call)")
    print(f"judge_photo (front, accepted):           median {judged.wall_ms:.1f} ms over {args.repeats} "
          f"(CPU {judged.cpu_ms:.1f} ms, {judged.faults:.0f} minor faults a call)")
    print(f"ratio judge/baseline, in turn: {judged.wall_ms / decoded.wall_ms:.2f} "
          f"(CPU time: {judged.cpu_ms / decoded.cpu_ms:.2f})")

    # The same measurement by framing: how close the main face is decides how many detection passes the quarter rule
    # needs (a face half as wide as the main one must be found too).
    print("by framing (12 MP JPEG, face width / short side; passes = detection passes on the 2000x1500 decode):")
    framings = [("half-body (the photo above)", data)] + [
        (f"selfie, face {fraction:.0%}", photos.encode(photos.phone_selfie_image(face_fraction=fraction), quality=90))
        for fraction in (0.3, 0.4, 0.5)]
    for name, photo in framings:
        def photo_baseline() -> None:
            full_decode(photo)

        def photo_judge() -> None:
            judge_photo(photo, role="front", accepted=[], limits=limits, analyzer=analyzer)

        photo_verdict, used = with_scales(analyzer, lambda: judge_photo(photo, role="front", accepted=[], limits=limits,
                                                                         analyzer=analyzer))
        photo_judged, photo_decoded = in_turn(photo_judge, photo_baseline, args.repeats)
        print(f"  {name:28s} {len(photo) / 1e6:.2f} MB, accepted {photo_verdict.accepted}, face "
              f"{photo_verdict.scores['face_fraction']:.2f}, passes: {', '.join(used)}: CPU ratio judge/decode "
              f"{photo_judged.cpu_ms / photo_decoded.cpu_ms:.2f} ({photo_judged.cpu_ms:.1f} / {photo_decoded.cpu_ms:.1f} ms)")

    # Where the time goes (same photo, same process), each stage also as a multiple of the full decode, in CPU time.
    rgb = _decode(_open(data, limits), data)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    found, passes = with_scales(analyzer, lambda: analyzer.faces(rgb, min_area_ratio=limits.second_face_max_ratio))
    face = found[0]
    glance = CASCADE_GLANCE_FACE * min(rgb.shape[:2])
    stages = {
        "header + draft decode": lambda: _decode(_open(data, limits), data),
        f"faces ({', '.join(passes)}; landmarks)": lambda: analyzer.faces(
            rgb, min_area_ratio=limits.second_face_max_ratio),
        "  of which the cascade's passes (P-Net pyramids, R-Net and O-Net)": lambda: analyzer._cascade_candidates(
            Halvings(rgb)),
        f"  (for comparison: the cascade in one pass from the glance's {glance:.0f} px faces)": lambda: (
            analyzer._cascade.detect(Halvings(rgb), glance)),
        "  (for comparison: dlib HOG's plan on the same decode, which ran before the cascade)": lambda: (
            analyzer._hog_candidates(rgb, gray, [])),
        "  (for comparison: one CNN check, 128 px crop, torch)": lambda: analyzer._confirmed_by_cnn(rgb, face.box),
        "embed (dlib's ResNet in torch on the 150 px chip)": lambda: analyzer.embed(rgb, face),
        "perceptual hash of the decoded photo (its own halvings; the judge reuses the cascade's)": lambda: photo_hash(
            Halvings(rgb)),
        "aligned_crop 512": lambda: analyzer.aligned_crop(rgb, face, 512),
    }
    for name, action in stages.items():
        stage_ms, stage_cpu_ms = median_wall_and_cpu_ms(action, max(3, args.repeats // 3))
        print(f"  {name}: median {stage_ms:.1f} ms, CPU {stage_cpu_ms:.1f} ms "
              f"({stage_cpu_ms / baseline_cpu_ms:.2f}x the full decode's CPU time)")


if __name__ == "__main__":
    main()
