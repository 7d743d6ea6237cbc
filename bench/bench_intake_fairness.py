"""Intake on real photos of real people (issue 15): the old rules against the new, in the same run.

Run: .venv/bin/python bench/bench_intake_fairness.py

Photos: tests/data/faces (Barack Obama x3, Joe Biden; White House, public domain; see its MANIFEST.md), the astronaut
(skimage) and Grace Hopper (matplotlib), both public domain. Six photos of four people: a handful, not a sample, so
every rate below is a count out of a few trials and is printed as such.

Prints, before (the rules as they were: frontalness ratio >= 0.6, face mean brightness 60..225, whole-photo hash for
duplicates, one global identity cut of 0.91) and after (models.intake today):
- the share of real front photos refused, and why; the same for darker-skin proxies of the real photos (skin x0.3);
- the identity check's false-reject rate (a held-out photo of a person judged against their other photos) and
  false-accept rate (every other person's photo judged against them);
- re-cropped copies refused as duplicates, and different photos of one person refused as duplicates.
"""

from __future__ import annotations

import io
import itertools
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import sample_photos as photos  # noqa: E402
from models.faces import FaceAnalyzer, cosine_similarity, identity_pivot  # noqa: E402
from models.halvings import Halvings  # noqa: E402
from models.intake import (AcceptedFace, IntakeLimits, _decode, _face_patch, _open, hamming,  # noqa: E402
                           judge_photo, photo_hash)

FACES = os.path.join(ROOT, "tests", "data", "faces")
LIMITS = IntakeLimits()


def real_photos() -> dict[str, tuple[str, bytes]]:
    """name -> (person, bytes)."""
    found = {}
    for name in ("obama", "obama2", "obama3", "biden"):
        with open(os.path.join(FACES, f"{name}.jpg"), "rb") as file:
            found[name] = (name.rstrip("23"), file.read())
    found["astronaut"] = ("collins", photos.astronaut_photo())
    found["grace_hopper"] = ("hopper", photos.grace_hopper_photo())
    return found


def old_front_reasons(data: bytes, analyzer: FaceAnalyzer) -> list[str]:
    """The quality verdict of a front photo under the old rules (face size and blur are unchanged, left out)."""
    rgb = _decode(_open(data, LIMITS), data)
    face = analyzer.faces(rgb, min_area_ratio=LIMITS.second_face_max_ratio)[0]
    patch = _face_patch(rgb, face)
    reasons = []
    if patch.mean() < 60:
        reasons.append("too_dark")
    if patch.mean() > 225 or (patch >= 250).mean() > 0.25:
        reasons.append("overexposed")
    if analyzer.frontalness(face) < 0.6:
        reasons.append("not_frontal")
    return reasons


def new_front_reasons(data: bytes, analyzer: FaceAnalyzer) -> list[str]:
    return judge_photo(data, role="front", accepted=[], limits=LIMITS, analyzer=analyzer).reasons


def share(refused: list, total: int) -> str:
    return f"{len(refused)}/{total} ({100 * len(refused) / max(total, 1):.0f}%)"


def front_photos(named: dict[str, bytes], analyzer: FaceAnalyzer, title: str) -> None:
    old = {name: old_front_reasons(data, analyzer) for name, data in named.items()}
    new = {name: new_front_reasons(data, analyzer) for name, data in named.items()}
    print(f"{title}: refused before {share([n for n in old if old[n]], len(named))}, "
          f"after {share([n for n in new if new[n]], len(named))}")
    for name in named:
        print(f"  {name:24s} before {old[name] or 'accepted'}  after {new[name] or 'accepted'}")


def embedding_of(data: bytes, analyzer: FaceAnalyzer) -> np.ndarray:
    verdict = judge_photo(data, role="extra", accepted=[], limits=LIMITS, analyzer=analyzer)
    if verdict.embedding is not None:
        return verdict.embedding
    rgb = _decode(_open(data, LIMITS), data)
    return analyzer.embed(rgb, analyzer.faces(rgb)[0])


def identity(named: dict[str, tuple[str, bytes]], analyzer: FaceAnalyzer) -> None:
    embeddings = {name: embedding_of(data, analyzer) for name, (_, data) in named.items()}
    person = {name: who for name, (who, _) in named.items()}
    users = {who: [n for n in named if person[n] == who] for who in set(person.values())}
    users = {who: names for who, names in users.items() if len(names) >= 3}
    rejects = {"before": [], "after": []}
    accepts = {"before": [], "after": []}
    trials_same = trials_other = 0
    for who, names in users.items():
        for held_out in names:
            own = [embeddings[n] for n in names if n != held_out]
            trials_same += 1
            similarity = cosine_similarity(embeddings[held_out], identity_pivot(own))
            if similarity < LIMITS.same_person_min_similarity:
                rejects["before"].append(held_out)
            verdict = judge_photo(named[held_out][1], role="extra", limits=LIMITS, analyzer=analyzer,
                                  accepted=[AcceptedFace(e, 0) for e in own])
            if verdict.reasons == ["different_person"]:
                rejects["after"].append(held_out)
        own = [embeddings[n] for n in names]
        for stranger in (n for n in named if person[n] != who):
            trials_other += 1
            if cosine_similarity(embeddings[stranger], identity_pivot(own)) >= LIMITS.same_person_min_similarity:
                accepts["before"].append(stranger)
            verdict = judge_photo(named[stranger][1], role="extra", limits=LIMITS, analyzer=analyzer,
                                  accepted=[AcceptedFace(e, 0) for e in own])
            if "different_person" not in verdict.reasons:
                accepts["after"].append(stranger)
    print(f"identity, users with 3+ photos: {sorted(users)}")
    for when in ("before", "after"):
        print(f"  {when:6s} false rejects {share(rejects[when], trials_same)}, "
              f"false accepts {share(accepts[when], trials_other)}")
    pairs = [(cosine_similarity(embeddings[a], embeddings[b]), person[a] == person[b])
             for a, b in itertools.combinations(named, 2)]
    same = [s for s, is_same in pairs if is_same]
    other = [s for s, is_same in pairs if not is_same]
    print(f"  pairwise cosine: same person {min(same):.3f}-{max(same):.3f} ({len(same)} pairs), "
          f"different people {min(other):.3f}-{max(other):.3f} ({len(other)} pairs)")


def recropped(data: bytes, box: tuple[float, float, float, float]) -> bytes:
    image = Image.open(io.BytesIO(data))
    left, top, right, bottom = box
    return photos.encode(image.crop((int(left * image.width), int(top * image.height), int(right * image.width),
                                     int(bottom * image.height))), quality=80)


def duplicates(named: dict[str, tuple[str, bytes]], analyzer: FaceAnalyzer) -> None:
    boxes = [(0.2, 0.05, 0.9, 0.7), (0.1, 0.0, 1.0, 0.55), (0.05, 0.05, 0.95, 0.95)]
    copies_old, copies_new, trials = [], [], 0
    distinct_old, distinct_new, distinct_trials = [], [], 0
    for name in ("obama", "obama2", "obama3", "biden"):
        data = named[name][1]
        original = judge_photo(data, role="extra", accepted=[], limits=LIMITS, analyzer=analyzer)
        earlier = AcceptedFace(original.embedding, original.phash, original.face_hash, original.tone)
        for box in boxes:
            copy = recropped(data, box)
            trials += 1
            copy_hash = photo_hash(Halvings(_decode(_open(copy, LIMITS), copy)))
            if hamming(copy_hash, original.phash) <= LIMITS.duplicate_distance:
                copies_old.append(name)
            if "duplicate_photo" in judge_photo(copy, role="extra", accepted=[earlier], limits=LIMITS,
                                                analyzer=analyzer).reasons:
                copies_new.append(name)
        for other in ("obama", "obama2", "obama3"):
            if name.startswith("obama") and other != name:
                distinct_trials += 1
                verdict = judge_photo(named[other][1], role="extra", accepted=[earlier], limits=LIMITS,
                                      analyzer=analyzer)
                if hamming(verdict.phash, original.phash) <= LIMITS.duplicate_distance:
                    distinct_old.append(other)
                if "duplicate_photo" in verdict.reasons:
                    distinct_new.append(other)
    print(f"re-cropped copies (3 crops of 4 photos) refused as duplicate_photo: before {share(copies_old, trials)}, "
          f"after {share(copies_new, trials)}")
    print(f"different photos of one person refused as duplicate_photo: before {share(distinct_old, distinct_trials)}, "
          f"after {share(distinct_new, distinct_trials)}")


def main() -> None:
    analyzer = FaceAnalyzer()
    named = real_photos()
    front_photos({name: data for name, (_, data) in named.items()}, analyzer, "real front photos")
    front_photos({f"{name} (skin x0.3)": photos.darker_skin_photo(data, analyzer, 0.3)
                  for name, (_, data) in named.items()}, analyzer,
                 "darker-skin proxies as front photos")
    identity(named, analyzer)
    duplicates(named, analyzer)


if __name__ == "__main__":
    main()
