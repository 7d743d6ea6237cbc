"""Photo uploads at the same moment (issue 11 item 5): the shared face analyzer survives concurrent callers, and the
per-avatar limits (MAX_PHOTOS, duplicates) hold when uploads to one avatar race each other.

Uploads go through the real threaded HTTP server (werkzeug, a thread per request, like the dev server and gunicorn's
gthread workers), all released at one instant; each is answered `judging`, and the intake queue (run by `judge`
afterwards, as the intake worker would) gives the verdicts.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import requests

from models import sample_photos
from models.intake import AcceptedFace, IntakeLimits, hamming, judge_photo
from portraits import avatars, keys

ROOT = Path(__file__).resolve().parent.parent

# Many judge calls in threads on one shared FaceAnalyzer, compared with the same calls made one after another. Run in
# a child process: before the analyzer serialised its dlib calls, this aborted the interpreter ("corrupted size vs.
# prev_size", SIGABRT) or segfaulted, which would take pytest down with it.
CONCURRENT_JUDGING = textwrap.dedent("""
    import random, threading
    from models import sample_photos
    from models.faces import FaceAnalyzer
    from models.intake import IntakeLimits, judge_photo

    photos = sample_photos.astronaut_photos(4) + [sample_photos.two_faces_photo(1.0),
                                                  sample_photos.non_face_photos()["coffee"]]
    analyzer, limits = FaceAnalyzer(), IntakeLimits()

    def judge(data):
        verdict = judge_photo(data, role="front", accepted=[], limits=limits, analyzer=analyzer, training_size=64)
        embedding = None if verdict.embedding is None else verdict.embedding.round(9).tobytes()
        crop = None if verdict.crop is None else verdict.crop.tobytes()
        return verdict.accepted, tuple(verdict.reasons), verdict.phash, embedding, crop

    expected = [judge(data) for data in photos]
    assert [e[0] for e in expected] == [True] * 4 + [False, False], expected
    THREADS, ROUNDS = 4, 2
    barrier = threading.Barrier(THREADS)
    wrong, done = [], []

    def run(seed):
        order = list(range(len(photos))) * ROUNDS
        random.Random(seed).shuffle(order)
        barrier.wait()
        for index in order:
            if judge(photos[index]) != expected[index]:
                wrong.append(index)
            done.append(index)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} concurrent verdicts differ from the sequential ones: {sorted(wrong)}"
    print(f"ok {len(done)}")
""")


def test_concurrent_judging_on_one_shared_analyzer_gives_the_sequential_verdicts():
    result = subprocess.run([sys.executable, "-c", CONCURRENT_JUDGING], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    assert result.stdout.split() == ["ok", str(4 * 2 * 6)]


# ------------------------------------------------------------------------------------------- one avatar, many uploads


@pytest.fixture(scope="module")
def distinct_photos(face_analyzer):
    """30 photos of the astronaut, each one acceptable, pairwise well beyond the whole-photo duplicate distance and
    none a re-framed copy of another's face (judged in turn, as the intake would)."""
    limits = IntakeLimits()
    margin = limits.duplicate_distance + 2
    kept, accepted = [], []
    for data in sample_photos.astronaut_photos(40):
        verdict = judge_photo(data, role="extra", accepted=accepted, limits=limits, analyzer=face_analyzer)
        if verdict.accepted and all(hamming(verdict.phash, other.phash) > margin for other in accepted):
            kept.append(data)
            accepted.append(AcceptedFace(verdict.embedding, verdict.phash, verdict.face_hash, verdict.tone))
    assert len(kept) >= 30
    return kept[:30]


def upload_together(http_server, api, avatar_id: str, photos: list[bytes]) -> list[tuple[int, dict]]:
    """POST every photo to the avatar at once, one thread each, through the real threaded server."""
    url = f"http://127.0.0.1:{http_server.server_port}/api/v1/avatars/{avatar_id}/photos"
    barrier = threading.Barrier(len(photos))
    answers: list = [None] * len(photos)

    def post(index: int) -> None:
        barrier.wait()
        response = requests.post(url, headers={"Authorization": f"Bearer {api.token}"}, data={"role": "extra"},
                                 files={"photo": ("photo.jpg", photos[index], "image/jpeg")}, timeout=120)
        answers[index] = (response.status_code, response.json())

    threads = [threading.Thread(target=post, args=(index,)) for index in range(len(photos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def outcome(answer: tuple[int, dict]) -> str:
    status, body = answer
    if status == 201:
        return body["state"]
    return f"{status}:{body['error']['code']}"


def verdicts(services, avatar_id: str) -> list[str]:
    return sorted("accepted" if p["accepted"] else "refused:" + ",".join(p["reasons"])
                  for p in services.db.avatars.find_one({"_id": avatar_id})["photos"])


def new_avatar(api) -> str:
    created = api.post("/api/v1/avatars", json={"gender": "female"})
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"]


def stored(services, avatar_id: str) -> dict:
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    # Every accepted photo keeps its crop and embedding; nothing else of the uploads is left behind.
    blobs = sorted(services.blobs.keys(f"users/{avatar['user_id']}/avatars/{avatar_id}/"))
    assert blobs == sorted(k for p in accepted for k in (p["crop_key"], p["embedding_key"]))
    return avatar


@pytest.mark.parametrize("settings_overrides", [{"min_photos": 2, "max_photos": 3}])
def test_thirty_uploads_at_once_accept_exactly_max_photos(app, services, login, http_server, distinct_photos, judge):
    api = login()
    avatar_id = new_avatar(api)
    answers = upload_together(http_server, api, avatar_id, distinct_photos)
    outcomes = sorted(outcome(answer) for answer in answers)
    assert outcomes == sorted(["judging"] * 3 + ["409:too_many_photos"] * 27), outcomes
    judge()
    avatar = stored(services, avatar_id)
    assert [p["accepted"] for p in avatar["photos"]] == [True] * 3


def test_ten_uploads_of_one_photo_at_once_accept_it_once(app, services, login, http_server, user_photos, judge):
    api = login()
    avatar_id = new_avatar(api)
    answers = upload_together(http_server, api, avatar_id, [user_photos[0]] * 10)
    assert [outcome(answer) for answer in answers] == ["judging"] * 10
    judge()
    assert verdicts(services, avatar_id) == ["accepted"] + ["refused:duplicate_photo"] * 9
    avatar = stored(services, avatar_id)
    assert sum(p["accepted"] for p in avatar["photos"]) == 1 and len(avatar["photos"]) == 10


@pytest.mark.parametrize("settings_overrides", [{"min_photos": 2, "max_photos": 2}])
def test_without_the_lock_the_database_still_holds_the_limits(app, services, login, http_server, distinct_photos,
                                                              user_photos, monkeypatch):
    """Should the Redis locks be lost (expired), the compare-and-sets on the photo list still keep the count and the
    duplicate check: an upload is recorded only next to the photos it counted, a verdict of `accepted` only against
    the accepted photos it was judged with; an upload that keeps losing the race is told to try again."""
    monkeypatch.setattr(avatars, "upload_lock", lambda _services, _avatar_id: nullcontext())
    monkeypatch.setattr(avatars, "judging_lock", lambda _services, _avatar_id: nullcontext())
    api = login()
    avatar_id = new_avatar(api)
    outcomes = [outcome(answer) for answer in upload_together(http_server, api, avatar_id, distinct_photos[:6])]
    assert outcomes.count("judging") == 2, outcomes
    assert set(outcomes) <= {"judging", "409:too_many_photos", "503:avatar_busy"}, outcomes
    judge_together(services, avatar_id)
    assert [p["accepted"] for p in stored(services, avatar_id)["photos"]] == [True, True]

    other_id = new_avatar(api)
    outcomes = [outcome(answer) for answer in upload_together(http_server, api, other_id, [user_photos[1]] * 4)]
    assert set(outcomes) <= {"judging", "409:too_many_photos", "503:avatar_busy"} and "judging" in outcomes, outcomes
    judge_together(services, other_id)
    assert verdicts(services, other_id) == ["accepted"] + ["refused:duplicate_photo"] * (outcomes.count("judging") - 1)
    assert sum(p["accepted"] for p in stored(services, other_id)["photos"]) == 1


def judge_together(services, avatar_id: str) -> None:
    """Every photo of the avatar still judging, judged at one instant, one thread each (intake workers racing)."""
    waiting = [p["id"] for p in services.db.avatars.find_one({"_id": avatar_id})["photos"] if p["state"] == "judging"]
    barrier = threading.Barrier(len(waiting))
    failures = []

    def run(photo_id: str) -> None:
        barrier.wait()
        try:
            avatars.judge_upload(services, avatar_id, photo_id)
        except Exception as error:  # a judging that kept losing the race fails its job; RQ retries it
            failures.append(error)
            avatars.judge_upload(services, avatar_id, photo_id)

    threads = [threading.Thread(target=run, args=(photo_id,)) for photo_id in waiting]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_an_upload_that_cannot_get_the_avatar_in_time_is_refused_as_busy(app, services, login, user_photos,
                                                                         monkeypatch):
    monkeypatch.setattr(avatars, "UPLOAD_LOCK_WAIT_S", 0.2)
    api = login()
    avatar_id = new_avatar(api)
    held = services.redis.lock(keys.avatar_upload_lock(avatar_id), timeout=30)
    assert held.acquire(blocking=False)
    try:
        response = api.upload(avatar_id, user_photos[0], role="front")
    finally:
        held.release()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "avatar_busy"
    assert stored(services, avatar_id)["photos"] == []  # and its sealed upload is gone with it
    # Once the other upload is done, the same call goes through.
    assert api.upload(avatar_id, user_photos[0], role="front").get_json()["state"] == "judging"
