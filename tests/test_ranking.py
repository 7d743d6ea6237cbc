"""Likeness ranking proven on real faces (photos shipped in installed packages), without the diffusion model.

The astronaut is "the user" (her pivot comes from some photos of her); Grace Hopper is another person; coffee has
no face; the two-faces photo shows both women.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from models.ranking import (CandidateJudge, RankedCandidate, merge_with_parent, rank_candidates, rank_scored,
                            score_candidate)
from models import sample_photos
from models.faces import identity_pivot


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def pivot(face_analyzer) -> np.ndarray:
    embeddings = []
    for data in sample_photos.astronaut_photos(4, seed=7):
        rgb = np.asarray(_decode(data))
        faces = face_analyzer.faces(rgb)
        embeddings.append(face_analyzer.embed(rgb, faces[0]))
    return identity_pivot(embeddings)


@pytest.fixture(scope="module")
def candidates() -> dict[str, Image.Image]:
    """Candidates as a render would draw them, interleaved so draw order is not likeness order."""
    same = [_decode(d) for d in sample_photos.astronaut_photos(3, seed=101)]
    other = [_decode(d) for d in sample_photos.grace_hopper_photos(2, seed=5)]
    return {
        "other_0": other[0], "same_0": same[0], "no_face": sample_photos.coffee_image(), "same_1": same[1],
        "two_faces": _decode(sample_photos.two_faces_photo(1.0)), "other_1": other[1], "same_2": same[2],
    }


@pytest.fixture(scope="module")
def scores(candidates, pivot, face_analyzer) -> dict[str, tuple[int, float | None]]:
    return {name: score_candidate(image, pivot, face_analyzer) for name, image in candidates.items()}


def test_the_same_person_scores_above_another_person(scores):
    same = [scores[f"same_{i}"][1] for i in range(3)]
    other = [scores[f"other_{i}"][1] for i in range(2)]
    print(f"likeness same person {same}, other person {other}")
    assert all(s is not None for s in same + other)
    assert min(same) > max(other)
    assert min(same) > 0.5 > max(other), "the boundary of likeness() separates them"


def test_candidates_without_exactly_one_face_are_not_scored(scores):
    assert scores["no_face"] == (0, None)
    assert scores["two_faces"][0] == 2 and scores["two_faces"][1] is None


def test_ranking_drops_faceless_and_crowded_candidates_and_orders_by_likeness(candidates, scores, pivot,
                                                                             face_analyzer):
    images = list(candidates.values())
    names = list(candidates)
    ranked = rank_candidates(images, pivot, face_analyzer, keep=len(images))
    ranked_names = [names[c.index] for c in ranked]
    assert set(ranked_names) == {"same_0", "same_1", "same_2", "other_0", "other_1"}
    assert [c.likeness for c in ranked] == sorted((c.likeness for c in ranked), reverse=True)
    assert [c.likeness for c in ranked] == [scores[name][1] for name in ranked_names]
    assert all(name.startswith("same_") for name in ranked_names[:3])
    assert all(c.image is images[c.index] and c.faces == 1 for c in ranked)

    best_two = rank_candidates(images, pivot, face_analyzer, keep=2)
    assert [c.index for c in best_two] == [c.index for c in ranked[:2]]


def test_without_required_faces_unscorable_candidates_are_kept_last(candidates, pivot, face_analyzer):
    images = list(candidates.values())
    names = list(candidates)
    ranked = rank_candidates(images, pivot, face_analyzer, keep=len(images), require_face=False)
    assert len(ranked) == len(images)
    assert [names[c.index] for c in ranked[-2:]] == ["no_face", "two_faces"], "unscored, in draw order"
    assert all(c.likeness is not None for c in ranked[:-2])


def test_without_a_pivot_nothing_is_scored_but_faces_still_count(candidates, face_analyzer):
    images = list(candidates.values())
    ranked = rank_candidates(images, None, face_analyzer, keep=len(images))
    assert len(ranked) == 5 and all(c.likeness is None for c in ranked)
    assert [c.index for c in ranked] == sorted(c.index for c in ranked)


def _parent_docs(scores: dict, names: list[str]) -> list[dict]:
    return [{"_id": f"img_parent_{name}", "likeness": scores[name][1]} for name in names]


def test_more_like_me_keeps_the_parents_best_when_no_new_candidate_beats_it(candidates, scores, pivot,
                                                                          face_analyzer):
    # The parent kept two images of the user; the child's new candidates are all of somebody else.
    parent = _parent_docs(scores, ["same_0", "same_1"])
    fresh = rank_candidates([candidates["other_0"], candidates["other_1"], candidates["no_face"]], pivot,
                            face_analyzer, keep=2)
    merged = merge_with_parent(fresh, parent, keep=2)
    parent_best = max(d["likeness"] for d in parent)
    assert merged[0].likeness == parent_best and merged[0].image_id is not None
    assert [c.likeness for c in merged] == sorted((c.likeness for c in merged), reverse=True)
    assert merged[0].likeness >= parent_best


def test_more_like_me_returns_a_new_image_when_it_beats_the_parent(candidates, scores, pivot, face_analyzer):
    same = sorted(("same_0", "same_1", "same_2"), key=lambda n: scores[n][1])
    parent = _parent_docs(scores, [same[0], "other_0"])
    fresh = rank_candidates([candidates[same[2]], candidates["other_1"]], pivot, face_analyzer, keep=2)
    merged = merge_with_parent(fresh, parent, keep=2)
    assert merged[0].image_id is None and merged[0].image is candidates[same[2]]
    assert merged[0].likeness > scores[same[0]][1]
    assert merged[1].image_id == f"img_parent_{same[0]}"


def test_more_like_me_never_returns_a_best_below_the_parents(scores):
    scored = [scores[n][1] for n in ("same_0", "same_1", "same_2", "other_0", "other_1")]
    for parent_index, parent_score in enumerate(scored):
        parent = [{"_id": "img_p", "likeness": parent_score}]
        for fresh_index, fresh_score in enumerate(scored):
            fresh = [RankedCandidate(image=None, likeness=fresh_score, faces=1, index=0)]
            best = merge_with_parent(fresh, parent, keep=1)[0]
            assert best.likeness == max(parent_score, fresh_score)
            # A new candidate wins a tie: the user sees something new when it is as good.
            assert (best.image_id is None) == (fresh_score >= parent_score)


def test_unscored_parent_images_never_displace_new_ones():
    fresh = [RankedCandidate(image=None, likeness=None, index=i) for i in range(2)]
    merged = merge_with_parent(fresh, [{"_id": "img_p", "likeness": None}], keep=2)
    assert [c.image_id for c in merged] == [None, None]


def test_the_judge_scores_on_its_own_thread_with_its_own_analyzer_as_inline_ranking_does(candidates, pivot, scores,
                                                                                       face_analyzer):
    built_on, scored_on = [], []

    class Recording:
        def __init__(self):
            built_on.append(threading.current_thread())

        def faces(self, *args, **kwargs):
            scored_on.append(threading.current_thread())
            return face_analyzer.faces(*args, **kwargs)

        def embed(self, *args):
            return face_analyzer.embed(*args)

    judge = CandidateJudge(Recording)
    images = list(candidates.values())
    try:
        # Two batches, as a render submits them while it samples the next: one analyzer, built on the judge's thread.
        futures = [judge.score(images[:3], pivot), judge.score(images[3:], pivot)]
        judged = [score for future in futures for score in future.result()]
    finally:
        judge.close()
    assert judged == list(scores.values())
    assert len(built_on) == 1 and set(scored_on) == set(built_on) and built_on[0] is not threading.current_thread()
    assert rank_scored(images, judged, keep=3) == rank_candidates(images, pivot, face_analyzer, keep=3)
