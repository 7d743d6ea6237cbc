"""Face judging off the request path (issue 16 part 3): an upload is stored sealed and answered `judging`; the intake
queue's job judges it and the verdict lands in the avatar's photo list; the per-avatar rules (duplicates, identity,
MAX_PHOTOS) hold whatever order the verdicts land in; the sweep queues again a judging Redis lost; and a real
`python -m jobs.worker intake` process judges.
"""
from __future__ import annotations

import os

import pytest
import requests
from rq import Worker
from rq.job import Job

from miniapp_api.dev.supervisor import Topology
from models import sample_photos as photos
from portraits import avatars, keys, sweeper, tasks
from tests.conftest import phone_for
from tests.test_notifications import later
from tests.waiting import wait_for
from wechat_sim.client import SimulatorClient


def new_avatar(api) -> str:
    created = api.post("/api/v1/avatars", json={"gender": "female"})
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"]


def stored_photo(services, avatar_id: str, photo_id: str) -> dict:
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    return next(p for p in avatar["photos"] if p["id"] == photo_id)


def judging_job_ids(services) -> list[str]:
    return tasks.queue(services, tasks.INTAKE).get_job_ids()


def test_an_upload_is_answered_judging_and_its_verdict_lands_through_the_intake_job(login, services, user_photos,
                                                                                     judge):
    api = login()
    avatar_id = new_avatar(api)
    response = api.upload(avatar_id, user_photos[0], role="front")
    assert response.status_code == 201, response.get_json()
    taken = response.get_json()
    assert (taken["state"], taken["accepted"], taken["reasons"]) == ("judging", False, [])
    assert taken["avatar"]["missing"] == ["front_photo", "more_photos", "photos_judging"]
    # Nothing was judged in the request: the upload waits sealed, its judging queued by name on the intake queue.
    photo = stored_photo(services, avatar_id, taken["id"])
    assert photo["state"] == "judging" and "crop_key" not in photo
    raw = services.blobs.get(photo["upload_key"])
    assert raw.startswith(b"PV1") and raw != user_photos[0]
    assert services.sealed.get(api.user_id, photo["upload_key"]) == user_photos[0]
    assert judging_job_ids(services) == [keys.judge_job_id(taken["id"])]
    job = Job.fetch(keys.judge_job_id(taken["id"]), connection=services.redis)
    assert job.func_name == tasks.JUDGE_PHOTO and job.args == (avatar_id, taken["id"])
    assert services.db.content_checks.count_documents({}) == 0  # asked for after judging, not before

    assert judge() >= 1
    listed = api.get(f"/api/v1/avatars/{avatar_id}").get_json()
    assert [(p["id"], p["state"], p["accepted"], p["content_check"]) for p in listed["photos"]] == [
        (taken["id"], "accepted", True, "pending")]
    assert listed["missing"] == ["more_photos", "content_check_pending"]
    photo = stored_photo(services, avatar_id, taken["id"])
    assert "upload_key" not in photo and not services.blobs.exists(keys.photo_upload(api.user_id, avatar_id,
                                                                                      taken["id"]))
    assert services.db.content_checks.count_documents({"subject_id": taken["id"]}) == 1
    # Judging again (a duplicate delivery of the job) changes nothing.
    assert avatars.judge_upload(services, avatar_id, taken["id"]) == "not_judging"


def judge_in_order(services, avatar_id: str, photo_ids: list[str]) -> None:
    """The intake workers taking the jobs in this order (several workers, any order RQ hands them out in)."""
    for photo_id in photo_ids:
        assert avatars.judge_upload(services, avatar_id, photo_id) in ("accepted", "refused")


def verdicts(services, avatar_id: str) -> dict[str, tuple[str, list[str]]]:
    return {p["id"]: (p["state"], p["reasons"]) for p in services.db.avatars.find_one({"_id": avatar_id})["photos"]}


@pytest.mark.parametrize("order", ["as_uploaded", "reversed"])
def test_out_of_order_verdicts_keep_the_duplicate_and_identity_rules(login, services, user_photos, order):
    api = login()
    avatar_id = new_avatar(api)
    stranger = photos.grace_hopper_photo()
    uploads = [("stranger", stranger), ("a", user_photos[0]), ("b", user_photos[1]), ("c", user_photos[2]),
               ("a_again", user_photos[0])]
    ids = {}
    for name, data in uploads:
        taken = api.upload(avatar_id, data).get_json()
        assert taken["state"] == "judging", taken
        ids[name] = taken["id"]
    sequence = [ids[name] for name, _ in uploads]
    judge_in_order(services, avatar_id, sequence if order == "as_uploaded" else sequence[::-1])
    by_name = {name: verdicts(services, avatar_id)[photo_id] for name, photo_id in ids.items()}
    # Whoever was judged first, the stranger ends refused (at once against two photos of the astronaut, or later,
    # when the identity pass over the accepted photos finds her the odd one out), and one of the two copies of the
    # same photo is a duplicate of the other.
    assert by_name["stranger"] == ("refused", ["different_person"]), by_name
    assert by_name["b"][0] == by_name["c"][0] == "accepted", by_name
    assert sorted([by_name["a"], by_name["a_again"]]) == [("accepted", []), ("refused", ["duplicate_photo"])]
    # Only the accepted photos keep anything: a crop and an embedding each, no upload left waiting.
    assert len(list(services.blobs.keys(f"users/{api.user_id}/"))) == 3 * 2


@pytest.mark.parametrize("settings_overrides", [{"max_photos": 2}])
def test_photos_judging_count_toward_max_photos_and_a_refusal_makes_room(login, services, user_photos, judge):
    api = login()
    avatar_id = new_avatar(api)
    assert api.upload(avatar_id, user_photos[0]).get_json()["state"] == "judging"
    assert api.upload(avatar_id, photos.non_face_photos()["coffee"]).get_json()["state"] == "judging"
    third = api.upload(avatar_id, user_photos[1])
    assert third.status_code == 409 and third.get_json()["error"]["code"] == "too_many_photos"
    judge()  # the coffee cup is refused: room for one more
    assert api.upload(avatar_id, user_photos[1]).get_json()["state"] == "judging"
    judge()
    listed = services.db.avatars.find_one({"_id": avatar_id})["photos"]
    assert [(p["state"], p["reasons"]) for p in listed] == [("accepted", []), ("refused", ["no_face"]),
                                                            ("accepted", [])]


@pytest.mark.parametrize("settings_overrides", [{"max_refused_photos": 2}])
def test_uploads_in_flight_past_the_refusal_cap_are_refused_without_judging(login, services, user_photos, judge,
                                                                            monkeypatch):
    # Three uploads before any verdict: none is over the cap when it arrives. Once two are refused, the third
    # (a fine photo) is not judged at all: the cap is what bounds the CPU one avatar may spend.
    api = login()
    avatar_id = new_avatar(api)
    no_face = photos.non_face_photos()
    for data in (no_face["coffee"], no_face["chelsea_cat"], user_photos[0]):
        assert api.upload(avatar_id, data).get_json()["state"] == "judging"
    judged = []
    real = avatars.judge_photo
    monkeypatch.setattr(avatars, "judge_photo", lambda data, **kw: judged.append(data) or real(data, **kw))
    judge()
    listed = services.db.avatars.find_one({"_id": avatar_id})["photos"]
    assert [p["reasons"] for p in listed] == [["no_face"], ["no_face"], ["too_many_refused_photos"]]
    assert len(judged) == 2 and not list(services.blobs.keys(f"users/{api.user_id}/"))
    response = api.upload(avatar_id, user_photos[1])
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "too_many_refused_photos"


def test_the_sweep_queues_again_a_judging_redis_lost(login, services, user_photos, judge, monkeypatch):
    api = login()
    avatar_id = new_avatar(api)
    taken = api.upload(avatar_id, user_photos[0], role="front").get_json()
    services.redis.flushall()  # Redis lost its data: the judging job with it
    assert judging_job_ids(services) == []
    assert sweeper.sweep(services).get("judging_requeued") is None  # still within the grace of a live upload
    later(services, monkeypatch)
    assert sweeper.sweep(services)["judging_requeued"] == 1
    assert "judging_requeued" not in sweeper.sweep(services)  # queued once, not again while it waits
    assert judging_job_ids(services) == [keys.judge_job_id(taken["id"])]
    judge()
    assert stored_photo(services, avatar_id, taken["id"])["state"] == "accepted"
    assert "judging_requeued" not in sweeper.sweep(services)


def test_a_judging_whose_job_failed_for_good_is_queued_again_by_the_sweep(login, services, user_photos, judge,
                                                                         monkeypatch):
    api = login()
    avatar_id = new_avatar(api)
    taken = api.upload(avatar_id, user_photos[0], role="front").get_json()
    job = Job.fetch(keys.judge_job_id(taken["id"]), connection=services.redis)
    job.retries_left = 0
    job.save()
    monkeypatch.setattr(avatars, "judge_photo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("model away")))
    judge()
    assert job.get_status(refresh=True) == "failed"
    assert stored_photo(services, avatar_id, taken["id"])["state"] == "judging"  # the debt is still recorded
    monkeypatch.undo()
    later(services, monkeypatch)
    assert sweeper.sweep(services)["judging_requeued"] == 1
    judge()
    assert stored_photo(services, avatar_id, taken["id"])["state"] == "accepted"


# ------------------------------------------------------------------------------------------- a real intake process


@pytest.mark.mongo
def test_a_worker_process_of_kind_intake_judges_the_uploads(tmp_path, user_photos):
    """`web` (gunicorn) takes the upload and answers `judging`; `python -m jobs.worker intake`, a process of its own
    with its own dlib models, judges it; the verdict lands where the client polls."""
    topology = Topology(tmp_path / "instance", processes=("web", "intake"),
                        environ={**os.environ, "MIN_PHOTOS": "4", "TRAIN_RESOLUTION": "64"})
    topology.start()
    try:
        sim = SimulatorClient(topology.simulator_url)
        base = topology.base_url + "/api/v1"
        http = requests.Session()
        token = http.post(f"{base}/auth/login", json={"code": sim.login_code("ivy")}, timeout=60).json()["token"]
        http.headers["Authorization"] = f"Bearer {token}"
        assert http.post(f"{base}/me/phone", json={"code": sim.phone_code("ivy", phone_for("ivy"))},
                         timeout=60).status_code == 200
        version = http.get(f"{base}/consents", timeout=60).json()[0]["version"]
        assert http.post(f"{base}/consents", json={"kind": "face_processing", "version": version,
                                                   "age_14_or_over": True, "own_face": True},
                         timeout=60).status_code == 201
        avatar = http.post(f"{base}/avatars", json={"gender": "female"}, timeout=60).json()
        taken = http.post(f"{base}/avatars/{avatar['id']}/photos", data={"role": "front"},
                          files={"photo": ("p.jpg", user_photos[0], "image/jpeg")}, timeout=60).json()
        assert taken["state"] == "judging", taken

        def judged():
            listed = http.get(f"{base}/avatars/{avatar['id']}", timeout=60).json()["photos"]
            return listed if listed and listed[0]["state"] != "judging" else None

        listed = wait_for(judged, 120, "the intake worker's verdict", step_s=0.25)
        assert (listed[0]["state"], listed[0]["accepted"]) == ("accepted", True), listed
        redis = topology.shared_redis()
        job = Job.fetch(keys.judge_job_id(taken["id"]), connection=redis)
        intake_pid = topology.children["intake"].process.pid
        workers = {worker.name: worker for worker in Worker.all(connection=redis)}
        assert workers[job.worker_name].pid == intake_pid
        assert workers[job.worker_name].queue_names() == [tasks.INTAKE]
    finally:
        topology.stop()
