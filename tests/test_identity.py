"""Real identity: a phone bound through the getPhoneNumber code (WeChat's getuserphonenumber, played by the
simulator with real access tokens and single-use codes), sealed at rest, masked on show, exported in full, gone
with the user, and required before face consent and payment unless REQUIRE_PHONE is off."""
from __future__ import annotations

import pytest

from store_scan import StoreScanner, places
from tests.conftest import Api, bind_phone, phone_for

PHONE = "13800138000"


def _fresh_user(client, sim, name: str) -> Api:
    body = client.post("/api/v1/auth/login", json={"code": sim.login_code(name)}).get_json()
    return Api(client, body["token"], body["user"]["id"])


def _consent(api):
    version = api.get("/api/v1/consents").get_json()[0]["version"]
    return api.post("/api/v1/consents", json={"kind": "face_processing", "version": version,
                                              "age_14_or_over": True, "own_face": True})


def _error_code(response) -> str:
    return response.get_json()["error"]["code"]


def test_a_bound_phone_is_sealed_masked_on_show_and_exported_in_full(client, sim, services):
    api = _fresh_user(client, sim, "alice")
    assert api.get("/api/v1/me").get_json()["phone"] is None

    bound = api.post("/api/v1/me/phone", json={"code": sim.phone_code("alice", PHONE)})
    assert bound.status_code == 200, bound.get_json()
    assert bound.get_json()["masked"] == "138****8000" and bound.get_json()["country_code"] == "86"
    profile = api.get("/api/v1/me").get_json()
    assert profile["phone"]["masked"] == "138****8000" and profile["phone_required"] is True
    assert PHONE not in api.get("/api/v1/me").get_data(as_text=True)

    exported = api.get("/api/v1/me/export").get_json()["user"]["phone"]
    assert {k: exported[k] for k in ("phone_number", "pure_phone_number", "country_code")} == {
        "phone_number": PHONE, "pure_phone_number": PHONE, "country_code": "86"}
    assert exported["bound_at"]

    # At rest: only ciphertext under the user's data key, nowhere a plain copy.
    record = services.db.users.find_one({"_id": api.user_id})["phone"]
    assert bytes(record["sealed"]).startswith(b"PV1")
    assert StoreScanner(services).scan({"phone": PHONE, "masked": "138****8000"}) == set()


def test_a_phone_code_is_single_use_and_must_be_this_apps(client, sim, services):
    api = _fresh_user(client, sim, "alice")
    code = sim.phone_code("alice", PHONE)
    assert api.post("/api/v1/me/phone", json={"code": code}).status_code == 200
    replayed = api.post("/api/v1/me/phone", json={"code": code})
    assert replayed.status_code == 400 and _error_code(replayed) == "invalid_phone_code"
    assert replayed.get_json()["error"]["details"] == {"errcode": 40029}
    never_issued = api.post("/api/v1/me/phone", json={"code": "never-issued"})
    assert never_issued.status_code == 400 and _error_code(never_issued) == "invalid_phone_code"

    # A code whose answer is watermarked for another mini-program binds nothing.
    foreign = sim.phone_code("alice", "13911112222", appid="wx0000000000000000")
    refused = api.post("/api/v1/me/phone", json={"code": foreign})
    assert refused.status_code == 400 and _error_code(refused) == "invalid_phone_code"
    assert api.get("/api/v1/me").get_json()["phone"]["masked"] == "138****8000"

    missing = api.post("/api/v1/me/phone", json={})
    assert missing.status_code == 400 and _error_code(missing) == "invalid_fields"


def test_binding_survives_a_revoked_access_token_and_reports_wechat_down(client, sim):
    api = _fresh_user(client, sim, "alice")
    assert api.post("/api/v1/me/phone", json={"code": sim.phone_code("alice", PHONE)}).status_code == 200
    issued = sim.token_issued_count()
    sim.revoke_tokens()  # WeChat answers 40001; the gateway fetches a new token and asks again
    again = api.post("/api/v1/me/phone", json={"code": sim.phone_code("alice", "13900001111")})
    assert again.status_code == 200 and again.get_json()["masked"] == "139****1111"
    assert sim.token_issued_count() == issued + 1

    sim.set_fault("/wxa/business/getuserphonenumber", "5xx")
    down = api.post("/api/v1/me/phone", json={"code": sim.phone_code("alice", PHONE)})
    assert down.status_code == 503 and _error_code(down) == "wechat_unavailable"
    assert api.get("/api/v1/me").get_json()["phone"]["masked"] == "139****1111"


def test_without_a_phone_there_is_no_face_consent_and_no_order(client, sim, services, ready_avatar):
    api = _fresh_user(client, sim, "bob")
    refused = _consent(api)
    assert refused.status_code == 403 and _error_code(refused) == "phone_required"
    assert api.get("/api/v1/me").get_json()["consents"]["face_processing"] is None

    bind_phone(api, sim, "bob")
    assert _consent(api).status_code == 201

    # A user who consented before phones were required (no phone on record) cannot pay either.
    payer, avatar = ready_avatar("carol")
    services.db.users.update_one({"_id": payer.user_id}, {"$unset": {"phone": ""}})
    order = payer.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert order.status_code == 403 and _error_code(order) == "phone_required"
    assert services.db.orders.count_documents({"user_id": payer.user_id}) == 0
    assert sim.orders() == []  # no prepay reached WeChat Pay


@pytest.mark.parametrize("settings_overrides", [{"require_phone": False}])
def test_require_phone_off_lets_a_phone_less_user_consent_and_pay(login, services, sim, user_photos, drain,
                                                                  upload_judged):
    api = login("dave", phone=False)  # consents without a phone
    profile = api.get("/api/v1/me").get_json()
    assert profile["phone"] is None and profile["phone_required"] is False
    assert profile["consents"]["face_processing"]["current"]
    avatar = api.post("/api/v1/avatars", json={"gender": "male"}).get_json()
    for index, photo in enumerate(user_photos[:4]):
        assert upload_judged(api, avatar["id"], photo, role="front" if index == 0 else "extra")["accepted"]
    drain()  # WeChat's content check passes the photos
    order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert order.status_code == 201, order.get_json()


def test_withdrawing_consent_keeps_the_phone_and_deleting_me_erases_it(login, services, sim, client):
    api = login("alice")
    phone = phone_for("alice")
    assert api.delete("/api/v1/consents/face_processing").status_code == 200
    again = login("alice", phone=False, consent=False)
    # Sealed again under the new data key (the old one was shredded with the face data).
    assert again.get("/api/v1/me").get_json()["phone"]["masked"] == f"{phone[:3]}****{phone[-4:]}"
    assert again.get("/api/v1/me/export").get_json()["user"]["phone"]["pure_phone_number"] == phone
    assert _consent(again).status_code == 201

    scanner = StoreScanner(services)
    assert scanner.scan({"phone": phone}) == set()
    assert ("mongo", "users") in places(scanner.scan({"user_id": again.user_id}))
    assert again.delete("/api/v1/me").status_code == 202
    assert services.db.users.find_one({"_id": again.user_id}) is None
    assert scanner.scan({"phone": phone, "user_id": again.user_id}) == set()
