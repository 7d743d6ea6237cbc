"""Ranking rendered candidates by likeness to the user's identity pivot (cosine similarity of face embeddings)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.faces import likeness

# A second face with at most this share of the main face's area is background, as in photo intake.
SECOND_FACE_MAX_RATIO = 0.25


@dataclass(frozen=True)
class RankedCandidate:
    """One image considered for a render's result, with its likeness to the user (None: not scorable)."""

    image: Image.Image | None
    likeness: float | None
    faces: int | None = None  # usable faces found; None when not analysed (carried over from a parent)
    index: int = 0  # position among the candidates drawn
    image_id: str | None = None  # set for a stored image carried over from the parent render


def score_candidate(image: Image.Image, pivot: np.ndarray | None, analyzer) -> tuple[int, float | None]:
    """(usable faces, likeness to pivot). Likeness is None unless there is exactly one usable face and a pivot."""
    rgb = np.asarray(image.convert("RGB"))
    # A background face smaller than the intake's second-face limit does not make the candidate ambiguous.
    faces = analyzer.faces(rgb, min_area_ratio=SECOND_FACE_MAX_RATIO)
    if len(faces) != 1 or pivot is None:
        return len(faces), None
    return 1, round(float(likeness(analyzer.embed(rgb, faces[0]), pivot)), 4)


def rank_candidates(images: list[Image.Image], pivot: np.ndarray | None, analyzer, keep: int,
                    require_face: bool = True) -> list[RankedCandidate]:
    """The best ``keep`` candidates, most like the pivot first.

    With ``require_face`` a candidate without exactly one usable face is dropped. Without it (the tiny random
    model draws no faces) such candidates are kept, unscored, after every scored one. Ties keep draw order.
    """
    ranked = []
    for index, image in enumerate(images):
        faces, score = score_candidate(image, pivot, analyzer)
        if require_face and faces != 1:
            continue
        ranked.append(RankedCandidate(image=image, likeness=score, faces=faces, index=index))
    return best_first(ranked)[:keep]


def best_first(candidates: list[RankedCandidate]) -> list[RankedCandidate]:
    """Scored before unscored, higher likeness first; stable, so earlier entries win ties."""
    return sorted(candidates, key=lambda c: (c.likeness is None, -(c.likeness or 0.0)))


def merge_with_parent(fresh: list[RankedCandidate], parent_images: list[dict], keep: int) -> list[RankedCandidate]:
    """More Like Me's guarantee: the child's best is never below its parent's.

    The parent's kept images compete with the child's new candidates on their stored likeness (same pivot, same
    embedder, so the scores are comparable); a new candidate wins a tie. Unscored parent images never displace
    anything, so on the tiny model the child shows only its own new images.
    """
    carried = [RankedCandidate(image=None, likeness=doc.get("likeness"), index=len(fresh) + i, image_id=doc["_id"])
               for i, doc in enumerate(parent_images) if doc.get("likeness") is not None]
    return best_first(list(fresh) + carried)[:keep]
