"""Shared by the intake tests: judging a photo as the upload route does, and the real photos under tests/data/faces
(see its MANIFEST.md for sources and licences)."""
from __future__ import annotations

from pathlib import Path

from models.faces import FaceAnalyzer
from models.intake import IntakeLimits, PhotoVerdict, judge_photo

FACES = Path(__file__).resolve().parent / "data" / "faces"
LIMITS = IntakeLimits()


def real_photo(name: str) -> bytes:
    """The file's bytes, exactly as committed (``obama``, ``obama2``, ``obama3``, ``biden``)."""
    return (FACES / f"{name}.jpg").read_bytes()


def judge(data: bytes, analyzer: FaceAnalyzer, *, role: str = "extra", accepted=(),
          limits: IntakeLimits = LIMITS) -> PhotoVerdict:
    return judge_photo(data, role=role, accepted=list(accepted), limits=limits, analyzer=analyzer)
