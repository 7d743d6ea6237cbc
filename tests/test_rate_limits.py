"""Rate limits (issue 13): login per address, the rest per user, counted in the app's Redis; 429 rate_limited with
Retry-After in the envelope. And the caps that are domain rules: refused photos per avatar, open avatars per user."""
from __future__ import annotations

import pytest

from models import sample_photos
from portraits import keys
from portraits.config import Settings
from tests.conftest import UNLIMITED
from tests.test_api import assert_error


def limited(**changes) -> dict:
    return {**UNLIMITED, **changes}


def assert_rate_limited(response):
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.get_json()["error"]["details"]["retry_after_s"] == int(response.headers["Retry-After"])


@pytest.mark.parametrize("settings_overrides", [limited(rate_limit_login="3/minute")])
def test_login_is_limited_per_address_before_wechat_is_asked(client, sim, services):
    for _ in range(3):
        assert client.post("/api/v1/auth/login", json={"code": sim.login_code("amy")}).status_code == 200
    sim.set_fault("/sns/jscode2session", "5xx", count=10)  # were WeChat called, this would answer 503
    assert_rate_limited(client.post("/api/v1/auth/login", json={"code": "anything"}))
    assert_rate_limited(client.post("/api/v1/auth/login", data=b"{", content_type="application/json"))
    sim.reset()
    other = client.post("/api/v1/auth/login", json={"code": sim.login_code("amy")},
                        environ_overrides={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 200
    assert services.redis.keys(keys.RATE_LIMITS + "*")  # counted in the app's Redis


@pytest.mark.parametrize("settings_overrides", [limited(rate_limit_avatars="2/hour")])
def test_avatar_creation_is_limited_per_user_not_per_address(login):
    alice, bob = login("alice"), login("bob")
    for _ in range(2):
        assert alice.post("/api/v1/avatars", json={"gender": "female"}).status_code == 201
    assert_rate_limited(alice.post("/api/v1/avatars", json={"gender": "female"}))
    assert bob.post("/api/v1/avatars", json={"gender": "male"}).status_code == 201  # same address, other user


@pytest.mark.parametrize("settings_overrides", [limited(rate_limit_uploads="3/minute")])
def test_uploads_are_limited_whether_accepted_or_refused(login, user_photos):
    api = login("cleo")
    avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    assert api.upload(avatar["id"], user_photos[0], role="front").get_json()["state"] == "judging"
    assert api.upload(avatar["id"], sample_photos.non_face_photos()["coffee"]).status_code == 201  # judged later
    assert_error(api.upload(avatar["id"], sample_photos.not_an_image_bytes()), 400, "not_an_image")
    assert_rate_limited(api.upload(avatar["id"], user_photos[1]))


@pytest.mark.parametrize("settings_overrides", [limited(rate_limit_orders="1/minute", rate_limit_renders="2/minute")])
def test_orders_and_renders_are_limited_per_user(login):
    api = login("dana")
    assert_error(api.post("/api/v1/orders", json={"avatar_id": "av_none", "sku": "avatar_pack"}), 404,
                 "avatar_not_found")
    assert_rate_limited(api.post("/api/v1/orders", json={"avatar_id": "av_none", "sku": "avatar_pack"}))
    assert_error(api.post("/api/v1/renders", json={"avatar_id": "av_none", "template_id": "t"}), 404,
                 "avatar_not_found")
    assert_error(api.post("/api/v1/renders/r_none/more-like-me"), 404, "render_not_found")  # one count for both
    assert_rate_limited(api.post("/api/v1/renders", json={"avatar_id": "av_none", "template_id": "t"}))
    assert_rate_limited(api.post("/api/v1/renders/r_none/more-like-me"))


DEFAULTS = {name: Settings.model_fields[name].default for name in UNLIMITED}


@pytest.mark.parametrize("settings_overrides", [DEFAULTS])
def test_the_default_login_limit_stops_a_flood_from_one_address(client):
    per_minute = int(DEFAULTS["rate_limit_login"].split("/")[0])
    answers = [client.post("/api/v1/auth/login", json={"code": "never-issued"}).status_code
               for _ in range(per_minute + 1)]
    assert answers[:-1] == [401] * per_minute
    assert answers[-1] == 429


@pytest.mark.parametrize("settings_overrides", [{"max_refused_photos": 2}])
def test_refused_photos_per_avatar_are_capped(login, user_photos, upload_judged):
    api = login("eve")
    avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    no_face = sample_photos.non_face_photos()
    for name in ("coffee", "chelsea_cat"):
        verdict = upload_judged(api, avatar["id"], no_face[name])
        assert (verdict["state"], verdict["reasons"]) == ("refused", ["no_face"]), verdict
    assert_error(api.upload(avatar["id"], no_face["coffee"]), 409, "too_many_refused_photos")
    assert_error(api.upload(avatar["id"], user_photos[0], role="front"), 409, "too_many_refused_photos")
    refused = [p for p in api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["photos"] if not p["accepted"]]
    assert len(refused) == 2


@pytest.mark.parametrize("settings_overrides", [{"max_open_avatars": 2}])
def test_avatars_not_paid_for_are_capped_per_user(login):
    api = login("fay")
    for _ in range(2):
        assert api.post("/api/v1/avatars", json={"gender": "female"}).status_code == 201
    response = api.post("/api/v1/avatars", json={"gender": "female"})
    assert_error(response, 409, "too_many_avatars")
    assert response.get_json()["error"]["details"] == {"max_open_avatars": 2}
    assert login("gus").post("/api/v1/avatars", json={"gender": "male"}).status_code == 201
