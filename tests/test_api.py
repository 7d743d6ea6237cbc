"""Bad input over the HTTP API: the error envelope with a stable reason code, and nothing stored or changed."""
from __future__ import annotations

import io

import pytest

from models import sample_photos


def snapshot(services) -> dict:
    """Everything a bad request could have touched."""
    db = services.db
    return {
        "collections": {name: list(db[name].find({}, {"history": 0})) for name in db.list_collection_names()},
        "blobs": sorted(services.blobs.keys()),
    }


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": "{not json", "content_type": "application/json"}, 400, "malformed_json"),
    ({"data": "code=abc", "content_type": "application/x-www-form-urlencoded"}, 415, "json_required"),
    ({"json": ["a list"]}, 400, "json_object_required"),
    ({"json": {}}, 400, "invalid_fields"),
    ({"json": {"code": 42}}, 400, "invalid_fields"),
    ({"json": {"code": "   "}}, 400, "invalid_fields"),
    ({"json": {"code": "never-issued"}}, 401, "invalid_login_code"),
])
def test_login_rejects_bad_input_and_creates_no_user(client, services, kwargs, status, code):
    before = snapshot(services)
    assert_error(client.post("/api/v1/auth/login", **kwargs), status, code)
    assert snapshot(services) == before


def test_a_login_code_works_once(client, sim):
    code = sim.login_code("bob")
    assert client.post("/api/v1/auth/login", json={"code": code}).status_code == 200
    assert_error(client.post("/api/v1/auth/login", json={"code": code}), 401, "invalid_login_code")


@pytest.mark.parametrize("header, code", [
    (None, "missing_token"),
    ("Basic abc", "missing_token"),
    ("Bearer ", "missing_token"),
    ("Bearer not-a-token", "invalid_token"),
])
def test_routes_need_a_valid_bearer_token(client, header, code):
    headers = {"Authorization": header} if header else {}
    for method, path in [("get", "/api/v1/consents"), ("post", "/api/v1/avatars"), ("get", "/api/v1/avatars/x"),
                         ("get", "/api/v1/avatars/x/queue"), ("get", "/api/v1/me/export"), ("delete", "/api/v1/me"),
                         ("get", "/api/v1/templates"), ("post", "/api/v1/orders"), ("get", "/api/v1/images/x")]:
        assert_error(getattr(client, method)(path, headers=headers), 401, code)


def test_a_forged_token_signed_with_another_key_is_refused(login, client):
    from itsdangerous import URLSafeTimedSerializer

    api = login("alice")
    forged = URLSafeTimedSerializer("some-other-key", salt="api-token").dumps({"uid": api.user_id, "gen": 0})
    assert_error(client.get("/api/v1/consents", headers={"Authorization": f"Bearer {forged}"}), 401, "invalid_token")
    tampered = api.token[:-2] + ("AA" if not api.token.endswith("AA") else "BB")
    assert_error(client.get("/api/v1/consents", headers={"Authorization": f"Bearer {tampered}"}), 401,
                 "invalid_token")


@pytest.mark.parametrize("settings_overrides", [{"token_ttl_s": -1}])
def test_an_expired_token_is_refused(login, client, sim):
    body = client.post("/api/v1/auth/login", json={"code": sim.login_code("carol")}).get_json()
    assert_error(client.get("/api/v1/consents", headers={"Authorization": f"Bearer {body['token']}"}), 401,
                 "token_expired")


def test_the_token_of_a_deleted_user_stops_working(login):
    api = login("dave")
    assert api.delete("/api/v1/me").status_code == 202
    assert_error(api.get("/api/v1/consents"), 401, "invalid_token")


@pytest.mark.parametrize("body, status, code", [
    ({"kind": "marketing", "version": "2026-11-01", "age_14_or_over": True, "own_face": True}, 400,
     "unknown_consent_kind"),
    ({"kind": "face_processing", "version": "2020-01-01", "age_14_or_over": True, "own_face": True}, 409,
     "consent_version_outdated"),
    ({"kind": "face_processing", "version": "2026-11-01", "age_14_or_over": False, "own_face": True}, 403,
     "guardian_consent_required"),
    ({"kind": "face_processing", "version": "2026-11-01", "age_14_or_over": True, "own_face": False}, 400,
     "own_face_confirmation_required"),
    ({"kind": "face_processing", "version": "2026-11-01", "age_14_or_over": "yes", "own_face": True}, 400,
     "invalid_fields"),
    ({"kind": "face_processing", "version": "2026-11-01"}, 400, "invalid_fields"),
])
def test_consent_needs_the_current_text_an_adult_and_the_own_face_confirmation(login, services, body, status, code):
    api = login("erin", consent=False)
    before = snapshot(services)
    assert_error(api.post("/api/v1/consents", json=body), status, code)
    assert snapshot(services) == before
    assert_error(api.post("/api/v1/avatars", json={"gender": "female"}), 403, "consent_required")


@pytest.mark.parametrize("body", [{}, {"gender": "other"}, {"gender": 1}])
def test_avatar_needs_a_known_gender(login, services, body):
    api = login("frank")
    before = snapshot(services)
    assert_error(api.post("/api/v1/avatars", json=body), 400, "invalid_fields")
    assert snapshot(services) == before


def test_uploads_that_are_not_photos_store_nothing(login, services):
    api = login("gina")
    avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    path = f"/api/v1/avatars/{avatar['id']}/photos"
    before = snapshot(services)
    assert_error(api.post(path, json={"photo": "x"}), 415, "multipart_required")
    assert_error(api.post(path, content_type="multipart/form-data", data={"role": "front"}), 400, "photo_missing")
    assert_error(api.upload(avatar["id"], sample_photos.astronaut_photo(), role="side"), 400, "invalid_fields")
    assert_error(api.upload(avatar["id"], sample_photos.not_an_image_bytes()), 400, "not_an_image")
    assert_error(api.upload(avatar["id"], sample_photos.gif_photo()), 415, "unsupported_format")
    assert_error(api.upload(avatar["id"], sample_photos.decompression_bomb_png()), 413, "too_many_pixels")
    assert snapshot(services) == before


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 200_000}])
def test_an_upload_over_the_byte_limit_stores_nothing(login, services):
    api = login("hank")
    avatar = api.post("/api/v1/avatars", json={"gender": "male"}).get_json()
    before = snapshot(services)
    assert_error(api.upload(avatar["id"], b"\xff\xd8\xff" + bytes(300_000)), 413, "file_too_large")
    assert snapshot(services) == before


def test_another_users_ids_answer_404_and_reveal_nothing(paid_avatar, drain, login):
    owner, avatar, order = paid_avatar("ivy")
    drain()
    template = owner.get("/api/v1/templates?gender=female").get_json()[0]
    render = owner.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template["id"]}).get_json()
    drain()
    image_id = owner.get(f"/api/v1/renders/{render['id']}").get_json()["images"][0]["id"]

    stranger = login("jack")
    for method, path, code, kwargs in [
        ("get", f"/api/v1/avatars/{avatar['id']}", "avatar_not_found", {}),
        ("get", f"/api/v1/avatars/{avatar['id']}/queue", "avatar_not_found", {}),
        ("get", f"/api/v1/orders/{order['id']}", "order_not_found", {}),
        ("get", f"/api/v1/renders/{render['id']}", "render_not_found", {}),
        ("post", f"/api/v1/renders/{render['id']}/more-like-me", "render_not_found", {}),
        ("get", f"/api/v1/images/{image_id}", "image_not_found", {}),
        ("get", f"/api/v1/images/{image_id}/poster", "image_not_found", {}),
        ("post", "/api/v1/orders", "avatar_not_found", {"json": {"avatar_id": avatar["id"], "sku": "avatar_pack"}}),
        ("post", "/api/v1/renders", "avatar_not_found",
         {"json": {"avatar_id": avatar["id"], "template_id": template["id"]}}),
    ]:
        same_id = {"X-Request-ID": "probe-1"}  # the one field of an error body that differs per request
        response = getattr(stranger, method)(path, headers=same_id, **kwargs)
        assert_error(response, 404, code)
        missing = getattr(stranger, method)(path.replace(avatar["id"], "av_missing").replace(order["id"], "P0")
                                            .replace(render["id"], "rd_missing").replace(image_id, "img_missing"),
                                            headers=same_id, **kwargs)
        assert missing.get_json() == response.get_json()
    upload = stranger.upload(avatar["id"], sample_photos.astronaut_photo())
    assert_error(upload, 404, "avatar_not_found")


def test_orders_refuse_unknown_products_unready_avatars_and_a_second_open_order(ready_avatar, login, services):
    api, avatar = ready_avatar("kate")
    before = snapshot(services)
    assert_error(api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "gold"}), 400, "unknown_sku")
    assert_error(api.post("/api/v1/orders", json={"avatar_id": avatar["id"]}), 400, "invalid_fields")
    assert snapshot(services) == before

    fresh = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    assert_error(api.post("/api/v1/orders", json={"avatar_id": fresh["id"], "sku": "avatar_pack"}), 409,
                 "avatar_not_ready")

    first = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert first.status_code == 201
    second = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert_error(second, 409, "order_already_open")
    assert second.get_json()["error"]["details"]["order_id"] == first.get_json()["id"]
    assert services.db.orders.count_documents({"avatar_id": avatar["id"]}) == 1


def test_renders_need_a_trained_avatar_a_known_template_of_its_gender(paid_avatar, drain, services):
    api, avatar, order = paid_avatar("lily")
    female = api.get("/api/v1/templates?gender=female").get_json()[0]["id"]
    male = api.get("/api/v1/templates?gender=male").get_json()[0]["id"]
    assert_error(api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": female}), 409,
                 "avatar_not_trained")
    drain()
    before = snapshot(services)
    assert_error(api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": "nope"}), 404,
                 "template_not_found")
    assert_error(api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": male}), 400,
                 "template_gender_mismatch")
    assert_error(api.post("/api/v1/renders", json={"avatar_id": avatar["id"]}), 400, "invalid_fields")
    assert snapshot(services) == before


def test_unknown_routes_and_methods_use_the_envelope(client):
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/api/v1/auth/login"), 405, "method_not_allowed")


def test_an_order_needs_the_current_consent_even_for_a_ready_avatar(ready_avatar, services):
    api, avatar = ready_avatar("nina")
    services.settings = services.settings.replace(consent_version="2027-01-01")
    before = snapshot(services)
    assert_error(api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}), 403,
                 "consent_required")
    assert snapshot(services) == before
