"""Ranking rendered candidates by likeness to the user's identity pivot (cosine similarity of face embeddings)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

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
    region_likeness: tuple[float | None, ...] | None = None  # an album candidate's likeness per member, in order


def score_candidate(image: Image.Image, pivot: np.ndarray | None, analyzer) -> tuple[int, float | None]:
    """(usable faces, likeness to pivot). Likeness is None unless there is exactly one usable face and a pivot."""
    rgb = np.asarray(image.convert("RGB"))
    # A background face smaller than the intake's second-face limit does not make the candidate ambiguous.
    faces = analyzer.faces(rgb, min_area_ratio=SECOND_FACE_MAX_RATIO)
    if len(faces) != 1 or pivot is None:
        return len(faces), None
    return 1, round(float(likeness(analyzer.embed(rgb, faces[0]), pivot)), 4)


def score_regions(image: Image.Image, regions: list[tuple[tuple[int, int, int, int], np.ndarray | None]],
                  analyzer) -> list[tuple[int, float | None]]:
    """An album candidate's (usable faces, likeness) per face region: each region's crop scored against its owner's
    pivot, as a single portrait is against its user's."""
    return [score_candidate(image.crop(box), pivot, analyzer) for box, pivot in regions]


def album_score(region_scores: list[tuple[int, float | None]], require_face: bool = True) -> tuple[bool, float | None]:
    """(usable, score) of an album candidate. Usable (with ``require_face``) only when every region shows exactly one
    usable face; its score is the worst of its members' likenesses, so no one's face is sacrificed for another's
    (None unless every region is scored)."""
    usable = not require_face or all(faces == 1 for faces, _ in region_scores)
    likenesses = [score for _, score in region_scores]
    if not usable or any(score is None for score in likenesses):
        return usable, None
    return True, min(likenesses)


def rank_album(images: list[Image.Image], region_scores: list[list[tuple[int, float | None]]], keep: int,
               require_face: bool = True) -> list[RankedCandidate]:
    """The best ``keep`` album candidates, the one whose worst face is likeliest first; unusable ones dropped, and
    unscored ones (the tiny model draws no faces) after every scored one. Each keeps its per-region likenesses."""
    ranked = []
    for index, (image, scores) in enumerate(zip(images, region_scores)):
        usable, score = album_score(scores, require_face)
        if usable:
            ranked.append(RankedCandidate(image=image, likeness=score, faces=min(faces for faces, _ in scores),
                                          index=index, region_likeness=tuple(s for _, s in scores)))
    return best_first(ranked)[:keep]


def rank_candidates(images: list[Image.Image], pivot: np.ndarray | None, analyzer, keep: int,
                    require_face: bool = True) -> list[RankedCandidate]:
    """The best ``keep`` candidates, most like the pivot first.

    With ``require_face`` a candidate without exactly one usable face is dropped. Without it (the tiny random
    model draws no faces) such candidates are kept, unscored, after every scored one. Ties keep draw order.
    """
    return rank_scored(images, [score_candidate(image, pivot, analyzer) for image in images], keep, require_face)


def rank_scored(images: list[Image.Image], scores: list[tuple[int, float | None]], keep: int,
                require_face: bool = True) -> list[RankedCandidate]:
    """rank_candidates on scores already taken (``score_candidate``'s (faces, likeness) per image)."""
    ranked = [RankedCandidate(image=image, likeness=score, faces=faces, index=index)
              for index, (image, (faces, score)) in enumerate(zip(images, scores))
              if not (require_face and faces != 1)]
    return best_first(ranked)[:keep]


class CandidateJudge:
    """Scores candidates on one dedicated thread that owns its face analyzer (dlib's objects are not thread-safe,
    so no other thread may use that analyzer), while the caller goes on sampling the next batch."""

    def __init__(self, make_analyzer: Callable[[], object]):
        self._make_analyzer = make_analyzer
        self._analyzer = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidate-judge")

    def score(self, images: list[Image.Image], pivot: np.ndarray | None) -> Future:
        """A future of [(faces, likeness)] for ``images``, in order."""
        return self._thread.submit(self._score, list(images), pivot)

    def score_regions(self, images: list[Image.Image],
                      regions: list[tuple[tuple[int, int, int, int], np.ndarray | None]]) -> Future:
        """A future of [[(faces, likeness) per region]] for album candidates ``images``, in order."""
        return self._thread.submit(self._score_regions, list(images), list(regions))

    def _score_regions(self, images, regions) -> list[list[tuple[int, float | None]]]:
        return [score_regions(image, regions, self._own_analyzer()) for image in images]

    def _score(self, images: list[Image.Image], pivot: np.ndarray | None) -> list[tuple[int, float | None]]:
        return [score_candidate(image, pivot, self._own_analyzer()) for image in images]

    def _own_analyzer(self):
        """The judge thread's analyzer, made on its first use there."""
        if self._analyzer is None:
            self._analyzer = self._make_analyzer()
        return self._analyzer

    def close(self) -> None:
        self._thread.shutdown(wait=True)


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
