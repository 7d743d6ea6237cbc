"""bench/gpu_check.py at toy size, as a subprocess: it runs end to end and prints every field of its report.

What it measures is not checked here (no times in tests); that it keeps running, so it is ready the day a GPU
machine is, is.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ROWS = {"ours_eager", "ours_batched_eager", "reference_eager", "ours_compiled", "reference_compiled"}
RENDERING_ROWS = {"ours_eager", "plain_eager", "ours_compiled", "plain_compiled"}


def test_the_toy_gpu_check_runs_every_phase_and_prints_its_report():
    finished = subprocess.run([sys.executable, "bench/gpu_check.py", "--toy"], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout.splitlines()
    assert any(line.startswith("ratios (ours / reference") for line in lines)
    assert any(line.startswith("projected time for one avatar (21 photos, 800 images seen)") for line in lines)
    report = json.loads(next(line for line in lines if line.startswith("GPU_CHECK_JSON ")).split(" ", 1)[1])

    assert report["size"] == "toy" and report["skipped"] == []
    assert set(report["training"]) == TRAINING_ROWS
    for row in report["training"].values():
        assert row["steps_per_s"] > 0 and row["images_per_s"] >= row["steps_per_s"]
        assert row["projected_avatar_s"] > 0
        assert "peak_gpu_mib" in row
    assert report["training"]["ours_batched_eager"]["images_per_s"] > report["training"]["ours_batched_eager"]["steps_per_s"]
    assert set(report["rendering"]) == RENDERING_ROWS
    for row in report["rendering"].values():
        assert row["per_image_s"] > 0 and row["set_s"] > 0
    assert all(value is not None and value > 0 for value in report["ratios"].values()), report["ratios"]
    assert set(report["projected_avatar_s"]) == TRAINING_ROWS
