"""Photo intake through the HTTP API: every refusal reason with a real image, readiness and what it still misses.

An upload is answered `judging` at once; its verdict lands through the intake queue (the `judge` and `upload_judged`
fixtures run it as the intake worker would)."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from models import sample_photos as photos
from store_scan import StoreScanner, photo_samples


@pytest.fixture(scope="module")
def astronaut():
    return photos.astronaut_photos(6)


def new_avatar(api, gender: str = "female") -> str:
    created = api.post("/api/v1/avatars", json={"gender": gender})
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"]


def avatar_blobs(services, api) -> list[str]:
    return list(services.blobs.keys(f"users/{api.user_id}/"))


def assert_nothing_of(services, data: bytes, name: str = "upload") -> None:
    found = StoreScanner(services).scan(photo_samples(data, name))
    assert not found, found


# Uploads that are not a usable picture: a 4xx error, no verdict recorded, nothing stored.
@pytest.mark.parametrize("settings_overrides, make, status, code", [
    ({}, photos.not_an_image_bytes, 400, "not_an_image"),
    ({}, photos.gif_photo, 415, "unsupported_format"),
    ({"max_upload_bytes": 300_000}, lambda: photos.oversized_file(300_001), 413, "file_too_large"),
    ({}, photos.decompression_bomb_png, 413, "too_many_pixels"),
    # The pixel limit is a setting: a normal 1024x1024 photo is over a 0.5 MP limit.
    ({"max_pixels": 500_000}, photos.astronaut_photo, 413, "too_many_pixels"),
], ids=["pdf", "gif", "over_byte_limit", "bomb", "over_pixel_setting"])
def test_an_upload_that_is_not_a_usable_picture_is_an_error_and_stores_nothing(login, services, make, status, code):
    api = login()
    avatar_id = new_avatar(api)
    data = make()
    response = api.upload(avatar_id, data, role="front")
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
    avatar = api.get(f"/api/v1/avatars/{avatar_id}").get_json()
    assert avatar["photos"] == [] and avatar["accepted_count"] == 0
    assert avatar_blobs(services, api) == []
    assert_nothing_of(services, data)


# Refusals the user sees in the photo list: recorded with their reasons, and still nothing of the photo stored. A
# JPEG whose header reads but whose pixels do not decode is only found out by the judging, so it is a verdict too.
@pytest.mark.parametrize("make, role, reason", [
    (lambda: photos.astronaut_photo()[:3000], "extra", "not_an_image"),
    (lambda: photos.tiny_photo(200), "extra", "image_too_small"),
    (lambda: photos.non_face_photos()["coffee"], "extra", "no_face"),
    (lambda: photos.non_face_photos()["chelsea_cat"], "extra", "no_face"),
    (lambda: photos.two_faces_photo(1.0), "extra", "multiple_faces"),
    (photos.small_face_photo, "extra", "face_too_small"),
    (photos.blurry_photo, "extra", "too_blurry"),
    (photos.dark_photo, "extra", "too_dark"),
    (photos.overexposed_photo, "extra", "overexposed"),
    (photos.head_turned_photo, "front", "not_frontal"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_refused_photo_is_a_recorded_verdict_with_its_reason(login, services, upload_judged, make, role, reason):
    api = login()
    avatar_id = new_avatar(api)
    data = make()
    verdict = upload_judged(api, avatar_id, data, role=role)
    assert verdict["accepted"] is False
    assert verdict["reasons"] == [reason]
    # Refused before WeChat's content check: it is never checked.
    assert verdict["avatar"]["photos"] == [{"id": verdict["id"], "role": role, "state": "refused", "accepted": False,
                                            "reasons": [reason], "content_check": None}]
    assert services.db.content_checks.count_documents({}) == 0
    assert avatar_blobs(services, api) == []
    assert_nothing_of(services, data)


def test_duplicates_and_another_person_are_refused_against_the_accepted_photos(login, services, astronaut,
                                                                              upload_judged):
    api = login()
    avatar_id = new_avatar(api)
    for index, data in enumerate(astronaut[:3]):
        verdict = upload_judged(api, avatar_id, data, role="front" if index == 0 else "extra")
        assert verdict["accepted"], verdict

    again = Image.open(io.BytesIO(astronaut[1]))
    resaved = photos.encode(again.resize((again.width * 9 // 10, again.height * 9 // 10)), quality=75)
    duplicate = upload_judged(api, avatar_id, resaved)
    assert (duplicate["accepted"], duplicate["reasons"]) == (False, ["duplicate_photo"])

    stranger = photos.grace_hopper_photo()
    other = upload_judged(api, avatar_id, stranger)
    assert (other["accepted"], other["reasons"]) == (False, ["different_person"])

    assert len(avatar_blobs(services, api)) == 3 * 2  # a crop and an embedding per accepted photo, nothing else
    assert_nothing_of(services, resaved, "duplicate")
    assert_nothing_of(services, stranger, "stranger")


def test_a_stranger_among_the_first_photos_is_dropped_once_the_others_agree(login, services, astronaut,
                                                                           upload_judged):
    # With fewer than two accepted photos there is no pivot yet, so Grace Hopper's photo is accepted at first.
    api = login()
    avatar_id = new_avatar(api)
    first = upload_judged(api, avatar_id, photos.grace_hopper_photo())
    assert first["accepted"], first
    for data in astronaut[:2]:
        assert upload_judged(api, avatar_id, data)["accepted"]
    listed = {p["id"]: p for p in api.get(f"/api/v1/avatars/{avatar_id}").get_json()["photos"]}
    assert listed[first["id"]]["accepted"] is False
    assert listed[first["id"]]["reasons"] == ["different_person"]
    assert not [key for key in avatar_blobs(services, api) if first["id"] in key]
    assert len(avatar_blobs(services, api)) == 2 * 2


def test_exif_orientation_is_applied_before_judging(login, services, upload_judged):
    api = login()
    avatar_id = new_avatar(api)
    upright = upload_judged(api, avatar_id, photos.exif_rotated_photo(6), role="front")
    assert upright["accepted"], upright
    # The same pixels without the orientation tag are a sideways face, which is no face to the detector.
    sideways = photos.encode(Image.open(io.BytesIO(photos.exif_rotated_photo(6))))
    assert upload_judged(api, avatar_id, sideways)["reasons"] == ["no_face"]


def test_accepted_faces_are_stored_sealed_aligned_and_at_the_training_size(login, services, astronaut, upload_judged):
    api = login()
    avatar_id = new_avatar(api)
    assert upload_judged(api, avatar_id, astronaut[0], role="front")["accepted"]
    stored = services.db.avatars.find_one({"_id": avatar_id})["photos"][0]
    raw = services.blobs.get(stored["crop_key"])
    assert raw.startswith(b"PV1") and b"\x89PNG" not in raw  # sealed, not a plain PNG
    crop = Image.open(io.BytesIO(services.sealed.get(api.user_id, stored["crop_key"])))
    size = services.settings.train_resolution
    assert crop.size == (size, size)
    face = services.face_analyzer().faces(__import__("numpy").asarray(crop.convert("RGB").resize((512, 512))))
    assert len(face) == 1


def test_the_avatar_is_ready_only_with_consent_a_frontal_front_photo_and_enough_photos(login, services, astronaut,
                                                                                        drain, upload_judged, judge):
    api = login()
    avatar_id = new_avatar(api)
    path = f"/api/v1/avatars/{avatar_id}"
    state = api.get(path).get_json()
    assert (state["state"], state["missing"]) == ("collecting", ["front_photo", "more_photos"])

    turned = upload_judged(api, avatar_id, photos.head_turned_photo(), role="front")
    assert turned["reasons"] == ["not_frontal"]
    assert api.get(path).get_json()["missing"] == ["front_photo", "more_photos"]

    for data in astronaut[1:5]:  # min_photos is 4 in tests: four extras, but no front photo yet
        assert upload_judged(api, avatar_id, data)["accepted"]
    drain()  # WeChat's content check passes them
    state = api.get(path).get_json()
    assert (state["state"], state["missing"], state["accepted_count"]) == ("collecting", ["front_photo"], 4)

    # The head-turned photo is fine as an extra; a frontal one is needed as the front photo. While it is judged the
    # avatar says so (and cannot be paid for); once accepted, it waits for WeChat's check.
    taken = api.upload(avatar_id, astronaut[0], role="front").get_json()
    assert taken["state"] == "judging" and taken["avatar"]["state"] == "collecting"
    assert taken["avatar"]["missing"] == ["front_photo", "photos_judging"]
    order = api.post("/api/v1/orders", json={"avatar_id": avatar_id, "sku": "avatar_pack"})
    assert order.status_code == 409 and order.get_json()["error"]["code"] == "avatar_not_ready"
    judge()
    front = api.get(path).get_json()
    assert front["state"] == "collecting" and front["missing"] == ["content_check_pending"]
    drain()
    assert (state := api.get(path).get_json())["state"] == "ready" and state["missing"] == []

    # A new consent text makes the old consent outdated: the avatar is not ready until the user consents again.
    services.settings = services.settings.replace(consent_version="2099-01-01")
    state = api.get(path).get_json()
    assert (state["state"], state["missing"]) == ("collecting", ["face_consent"])
    order = api.post("/api/v1/orders", json={"avatar_id": avatar_id, "sku": "avatar_pack"})
    assert order.status_code == 409 and order.get_json()["error"]["code"] == "avatar_not_ready"
    given = api.post("/api/v1/consents", json={"kind": "face_processing", "version": "2099-01-01",
                                               "age_14_or_over": True, "own_face": True})
    assert given.status_code == 201
    assert api.get(path).get_json()["state"] == "ready"


def test_fewer_photos_than_the_minimum_say_how_many_are_missing(login, services, astronaut, drain, upload_judged):
    api = login()
    avatar_id = new_avatar(api)
    assert upload_judged(api, avatar_id, astronaut[0], role="front")["accepted"]
    drain()
    state = api.get(f"/api/v1/avatars/{avatar_id}").get_json()
    assert state["missing"] == ["more_photos"]
    assert (state["accepted_count"], state["min_photos"], state["max_photos"]) == (1, 4, 30)


@pytest.mark.parametrize("settings_overrides", [{"max_photos": 2}])
def test_uploads_past_the_maximum_are_refused(login, services, astronaut, judge):
    # Photos still judging count: two uploads in flight already fill the avatar, before either verdict lands.
    api = login()
    avatar_id = new_avatar(api)
    for data in astronaut[:2]:
        assert api.upload(avatar_id, data).get_json()["state"] == "judging"
    response = api.upload(avatar_id, astronaut[2])
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "too_many_photos"
    judge()
    listed = api.get(f"/api/v1/avatars/{avatar_id}").get_json()["photos"]
    assert [p["state"] for p in listed] == ["accepted", "accepted"]
