"""Content security over the real protocol: photos and portraits are checked by WeChat's mediaCheckAsync (the
simulator fetches the signed media link itself and pushes the verdict, signed and, in safe mode, AES-encrypted, to
the app's message-push endpoint over HTTP)."""
from __future__ import annotations

import hashlib
import time

import itsdangerous
import pytest

from jobs import context
from jobs.content import submit_content_check
from jobs.worker import drain as drain_queues
from portraits import content_checks, keys, push_events, renders, sweeper, tasks
from portraits.gateways.wechat import MediaCheckQuotaExhausted, WeChatUnavailable
from tests.console_support import client_login, make_operator
from tests.test_api import assert_error
from wechat_sim.push import PushConfig, signed_push

PUSH = "/api/v1/wechat/push"


@pytest.fixture
def settings_overrides(request):
    # Small render sets keep the portrait tests fast; some tests add settings of their own (indirect parameters).
    return {"render_max_steps": 1, "render_max_candidates": 2, **getattr(request, "param", {})}


def _sign(token: str, *parts: str) -> str:
    return hashlib.sha1("".join(sorted((token, *parts))).encode()).hexdigest()


def _avatar_with_photos(api, user_photos, count: int = 4) -> dict:
    """Photos uploaded and judged acceptable (the intake queue run alone); WeChat's checks not yet run."""
    avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    for index, photo in enumerate(user_photos[:count]):
        taken = api.upload(avatar["id"], photo, role="front" if index == 0 else "extra").get_json()
        assert taken["state"] == "judging" and taken["avatar"]["photos"][-1]["content_check"] is None, taken
    drain_queues(context.services(), queues=(tasks.INTAKE,))  # the test's services, as the jobs see them
    listed = _avatar(api, avatar["id"])["photos"]
    assert [(p["accepted"], p["content_check"]) for p in listed] == [(True, "pending")] * count, listed
    return avatar


def _checks(services, **query) -> list[dict]:
    return list(services.db.content_checks.find(query))


def _avatar(api, avatar_id: str) -> dict:
    return api.get(f"/api/v1/avatars/{avatar_id}").get_json()


# --- the endpoint -------------------------------------------------------------------------------

def test_wechat_checks_the_push_url_with_the_token_and_a_forger_cannot(client, services):
    token = services.settings.wechat_push_token
    stamp, nonce = str(int(time.time())), "123456"
    good = client.get(PUSH, query_string={"signature": _sign(token, stamp, nonce), "timestamp": stamp,
                                          "nonce": nonce, "echostr": "echo-42"})
    assert good.status_code == 200 and good.get_data(as_text=True) == "echo-42"
    forged = client.get(PUSH, query_string={"signature": _sign("not-the-token", stamp, nonce), "timestamp": stamp,
                                            "nonce": nonce, "echostr": "echo-42"})
    assert_error(forged, 403, "push_signature_invalid")
    assert "echo-42" not in forged.get_data(as_text=True)
    assert_error(client.get(PUSH, query_string={"echostr": "x"}), 403, "push_signature_invalid")


def test_media_check_async_answers_with_wechats_errcodes(services, sim, login):
    login("gwen")
    openid, url = sim.openid_of("gwen"), "http://127.0.0.1:9/m.png"
    with pytest.raises(WeChatUnavailable) as unknown_user:
        services.wechat.media_check_async(url, "o-never-visited", 1)
    assert unknown_user.value.errcode == 61010
    with pytest.raises(WeChatUnavailable) as bad_scene:
        services.wechat.media_check_async(url, openid, 9)
    assert bad_scene.value.errcode == 40097
    sim.configure_media_checks(minute_limit=0)
    with pytest.raises(MediaCheckQuotaExhausted) as minute:
        services.wechat.media_check_async(url, openid, 1)
    sim.configure_media_checks(minute_limit=10, day_limit=0)
    with pytest.raises(MediaCheckQuotaExhausted) as day:
        services.wechat.media_check_async(url, openid, 1)
    assert (minute.value.errcode, day.value.errcode) == (45011, 45009)
    sim.configure_media_checks(day_limit=10, delay_s=3600)
    assert services.wechat.media_check_async(url, openid, 1)  # a trace_id
    assert sim.media_checks()[0]["status"] == "scheduled"


def test_a_safe_mode_push_needs_its_msg_signature_and_a_body_that_decrypts(client, services):
    settings = services.settings
    config = PushConfig(url=None, token=settings.wechat_push_token, aes_key=settings.wechat_push_aes_key)
    event = {"Event": "wxa_media_check", "appid": settings.wechat_appid, "trace_id": "t-1",
             "result": {"suggest": "risky", "label": 20002}, "errcode": 0}
    params, body, content_type = signed_push(config, settings.wechat_appid, "gh_x", event)

    def post(query, data=body):
        return client.post(PUSH, query_string=query, data=data, content_type=content_type)

    assert_error(post({**params, "msg_signature": "0" * 40}), 403, "push_msg_signature_invalid")
    assert_error(post(params, data=b'{"ToUserName": "gh_x"}'), 400, "push_malformed")
    assert_error(post(params, data=b"<xml><unclosed>"), 400, "push_malformed")
    assert services.db.content_verdicts.count_documents({}) == 0
    answered = post(params)  # the genuine one
    assert answered.status_code == 200 and answered.get_data(as_text=True) == "success"
    assert services.db.content_verdicts.find_one({"_id": "t-1"})["suggest"] == "risky"


# --- photos -------------------------------------------------------------------------------------

def test_a_photo_counts_only_once_the_pushed_verdict_passes_it(login, user_photos, services, sim, drain):
    api = login("pia")
    sim.media_check_rule("pass", openid=sim.openid_of("pia"), hold=True)  # WeChat takes its time
    avatar = _avatar_with_photos(api, user_photos)
    waiting = _avatar(api, avatar["id"])
    assert waiting["state"] == "collecting" and waiting["missing"] == ["content_check_pending"]
    order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert_error(order, 409, "avatar_not_ready")  # nobody pays for photos still being checked

    drain()  # the job submits each photo: WeChat has them, the verdicts are held back
    assert {c["state"] for c in _checks(services, avatar_id=avatar["id"])} == {"submitted"}
    assert _avatar(api, avatar["id"])["state"] == "collecting"

    sim.flush_media_checks(include_held=True)  # the verdicts are pushed now (safe mode: AES, msg_signature)
    ready = _avatar(api, avatar["id"])
    assert ready["state"] == "ready" and ready["missing"] == []
    assert {p["content_check"] for p in ready["photos"]} == {"pass"}
    assert {c["state"] for c in _checks(services, avatar_id=avatar["id"])} == {"pass"}
    # WeChat fetched each photo itself, from its signed link, and got a PNG.
    fetched = [c["fetch"] for c in sim.media_checks()]
    assert len(fetched) == 4 and all(f["status_code"] == 200 and f["bytes"] > 0 and f["error"] is None
                                     for f in fetched)
    assert all(f["content_type"] == "image/png" for f in fetched)
    assert api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).status_code == 201


def test_a_risky_photo_is_refused_and_its_crop_deleted(login, user_photos, services, sim, drain):
    api = login("rita")
    sim.media_check_rule("risky", openid=sim.openid_of("rita"), count=1)
    avatar = _avatar_with_photos(api, user_photos)
    drain()
    after = _avatar(api, avatar["id"])
    refused = [p for p in after["photos"] if not p["accepted"]]
    assert len(refused) == 1 and refused[0]["reasons"] == ["content_risky"] and refused[0]["content_check"] == "risky"
    # The first photo checked, the front one, was the risky one.
    assert refused[0]["role"] == "front"
    assert after["state"] == "collecting" and after["missing"] == ["front_photo", "more_photos"]
    stored = services.db.avatars.find_one({"_id": avatar["id"]})
    photo = next(p for p in stored["photos"] if p["id"] == refused[0]["id"])
    assert "crop_key" not in photo and "embedding_key" not in photo
    assert not services.blobs.exists(keys.photo_crop(api.user_id, avatar["id"], photo["id"]))


@pytest.mark.parametrize("settings_overrides", [{"wechat_push_mode": "plaintext"}], indirect=True)
@pytest.mark.parametrize("data_format", ["json", "xml"])
def test_plaintext_mode_in_json_and_xml(login, user_photos, services, sim, drain, data_format):
    sim.configure_push(mode="plaintext", data_format=data_format)
    api = login("paula")
    sim.media_check_rule("risky", openid=sim.openid_of("paula"), count=1)
    avatar = _avatar_with_photos(api, user_photos)
    drain()
    after = _avatar(api, avatar["id"])
    assert sorted(p["content_check"] for p in after["photos"]) == ["pass", "pass", "pass", "risky"]


def test_safe_mode_in_xml(login, user_photos, services, sim, drain):
    sim.configure_push(data_format="xml")
    api = login("sam")
    avatar = _avatar_with_photos(api, user_photos)
    drain()
    assert _avatar(api, avatar["id"])["state"] == "ready"


# --- forged pushes ------------------------------------------------------------------------------

def test_forged_pushes_are_refused_and_change_nothing(login, user_photos, services, sim, drain):
    api = login("fay")
    sim.media_check_rule("pass", openid=sim.openid_of("fay"), hold=True)
    avatar = _avatar_with_photos(api, user_photos, count=1)
    drain()
    trace_id = _checks(services, avatar_id=avatar["id"])[0]["trace_id"]
    forgeries = {
        "push_signature_invalid": {"token": "a-guessed-token"},
        "push_appid_mismatch": {"appid": "wx0000000000000000"},
        "push_expired": {"timestamp": int(time.time()) - 3600},
        "push_encryption_required": {"mode": "plaintext"},
    }
    for code, forgery in forgeries.items():
        answer = sim.forge_media_push(trace_id=trace_id, suggest="risky", **forgery)
        assert answer["status_code"] in (400, 403), (code, answer)
        assert f'"{code}"' in answer["body"], (code, answer)
    # A wrong EncodingAESKey under the right Token: the msg_signature holds, the ciphertext does not decrypt.
    garbled = sim.forge_media_push(trace_id=trace_id, suggest="risky", aes_key="B" * 42 + "A")
    assert garbled["status_code"] in (400, 403)
    assert any(f'"{code}"' in garbled["body"] for code in ("push_undecryptable", "push_appid_mismatch"))
    assert services.db.content_verdicts.count_documents({}) == 0
    assert _checks(services, avatar_id=avatar["id"])[0]["state"] == "submitted"
    assert _avatar(api, avatar["id"])["photos"][0]["content_check"] == "pending"

    # A genuine push replayed: taken once, refused the second time.
    stamp, nonce = int(time.time()), "777"
    first = sim.forge_media_push(trace_id="unrelated-trace", timestamp=stamp, nonce=nonce)
    assert first["status_code"] == 200 and first["body"] == "success"
    again = sim.forge_media_push(trace_id="unrelated-trace", timestamp=stamp, nonce=nonce)
    assert again["status_code"] == 403 and '"push_replayed"' in again["body"]
    assert _checks(services, avatar_id=avatar["id"])[0]["state"] == "submitted"


def test_a_push_that_lands_before_the_trace_id_is_written_is_still_applied(login, user_photos, services, sim):
    """WeChat can push before the submitter has written the trace_id: the verdict is kept and applied by whichever
    of the two comes second."""
    api = login("quick")
    avatar = _avatar_with_photos(api, user_photos, count=1)
    check = _checks(services, avatar_id=avatar["id"])[0]
    sim.media_check_rule("risky", openid=sim.openid_of("quick"), count=1, hold=True)
    original = services.wechat.media_check_async

    def push_first(*args):
        trace_id = original(*args)
        sim.flush_media_checks(trace_id=trace_id, include_held=True)  # pushed before we write it down
        assert services.db.content_verdicts.find_one({"_id": trace_id})["suggest"] == "risky"
        return trace_id

    services.wechat.media_check_async = push_first
    assert submit_content_check(check["_id"]) == "submitted"
    assert _checks(services, _id=check["_id"])[0]["state"] == "risky"
    assert _avatar(api, avatar["id"])["photos"][0]["reasons"] == ["content_risky"]


# --- quota --------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings_overrides", [{"content_check_per_minute": 2}], indirect=True)
def test_media_wait_in_a_queue_when_the_quota_is_used_up_and_are_drained_later(login, user_photos, services, sim,
                                                                                drain, client):
    api = login("quinn")
    avatar = _avatar_with_photos(api, user_photos)
    drain()
    checks = _checks(services, avatar_id=avatar["id"])
    assert sorted(c["state"] for c in checks) == ["pass", "pass", "queued", "queued"]
    assert all(c.get("waiting_for") == "quota" for c in checks if c["state"] == "queued")
    assert _avatar(api, avatar["id"])["missing"] == ["content_check_pending"]
    assert content_checks.waiting_counts(services)["waiting_for_quota"] == 2

    make_operator(services, "olga", "viewer")
    client_login(client, "olga")
    dashboard = client.get("/console/").get_data(as_text=True)
    assert 'id="content-checks-quota">2<' in dashboard

    # WeChat's own quota runs out too (45011): the medium goes back to the queue, nothing is lost.
    services.settings = services.settings.replace(content_check_per_minute=100)
    sim.configure_media_checks(minute_limit=0)
    sweeper.sweep(services)
    assert sorted(c["state"] for c in _checks(services, avatar_id=avatar["id"])) == ["pass", "pass", "queued",
                                                                                    "queued"]
    assert sim.media_check_stats()["rejected_for_quota"] == 1  # the drain stops at the first refusal

    sim.configure_media_checks(minute_limit=2000)  # the next minute
    done = sweeper.sweep(services)
    assert done.get("content_check_submitted") == 2
    drain()
    assert _avatar(api, avatar["id"])["state"] == "ready"
    assert content_checks.waiting_counts(services)["queued"] == 0


# --- the media link -----------------------------------------------------------------------------

def test_the_media_link_serves_its_one_file_while_it_is_checked_and_expires(login, user_photos, services, sim,
                                                                            drain, client):
    api = login("lena")
    sim.media_check_rule("pass", openid=sim.openid_of("lena"), hold=True)
    avatar = _avatar_with_photos(api, user_photos, count=2)
    drain()
    first, second = _checks(services, avatar_id=avatar["id"])
    link = content_checks.media_link(services, first["_id"])
    path = link.removeprefix(services.settings.public_base_url)
    served = client.get(path)
    assert served.status_code == 200 and served.mimetype == "image/png"
    assert served.data == services.sealed.get(api.user_id, first["blob_key"])
    assert served.data != services.sealed.get(api.user_id, second["blob_key"])

    token = path.rsplit("/", 1)[1]
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert_error(client.get(f"/api/v1/media/{tampered}"), 403, "media_link_invalid")
    assert_error(client.get("/api/v1/media/" + "x" * 40), 403, "media_link_invalid")
    other_salt = itsdangerous.URLSafeTimedSerializer(services.settings.secret_key, salt="other").dumps(first["_id"])
    assert_error(client.get(f"/api/v1/media/{other_salt}"), 403, "media_link_invalid")

    ttl = services.settings.media_link_ttl_s

    class SignedLongAgo(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - ttl - 5

    expired = itsdangerous.URLSafeTimedSerializer(services.settings.secret_key, salt="media-link",
                                                  signer=SignedLongAgo).dumps(first["_id"])
    assert_error(client.get(f"/api/v1/media/{expired}"), 403, "media_link_expired")
    assert client.get(path).status_code == 200  # the fresh link still works

    sim.flush_media_checks(include_held=True)  # decided: the link serves nothing any more
    assert_error(client.get(path), 404, "media_not_found")


# --- the timeout policy -------------------------------------------------------------------------

@pytest.mark.parametrize("policy, counted", [("refuse", False), ("accept", True)])
def test_a_check_wechat_never_answers_is_decided_by_the_timeout_policy(login, user_photos, services, sim, drain,
                                                                       policy, counted):
    api = login("tom")
    sim.media_check_rule("pass", openid=sim.openid_of("tom"), count=1, lose=True)
    avatar = _avatar_with_photos(api, user_photos)
    drain()
    assert _avatar(api, avatar["id"])["missing"] == ["content_check_pending"]
    sweeper.sweep(services)  # not overdue yet
    assert sorted(c["state"] for c in _checks(services, avatar_id=avatar["id"])).count("submitted") == 1

    services.settings = services.settings.replace(content_check_timeout_s=0, content_check_timeout_policy=policy)
    done = sweeper.sweep(services)
    assert done["content_check_timeout"] == 1
    after = _avatar(api, avatar["id"])
    timed_out = next(p for p in after["photos"] if p["content_check"] == "timeout")
    if counted:
        assert timed_out["accepted"] and after["state"] == "ready"
    else:
        assert not timed_out["accepted"] and timed_out["reasons"] == ["content_timeout"]
        assert timed_out["role"] == "front"  # the first one checked
        assert after["state"] == "collecting" and after["missing"] == ["front_photo", "more_photos"]
    assert sweeper.sweep(services).get("content_check_timeout") is None  # once


def test_a_push_we_fail_to_handle_is_pushed_again_by_wechat(login, user_photos, services, sim, drain, monkeypatch):
    sim.configure_media_checks(push_retries=2, push_retry_interval_s=0)
    real, failures = push_events.HANDLERS["wxa_media_check"], []

    def failing_once(svc, message):
        if not failures:
            failures.append(message["trace_id"])
            raise RuntimeError("the database went away for a moment")
        return real(svc, message)

    monkeypatch.setitem(push_events.HANDLERS, "wxa_media_check", failing_once)
    api = login("rob")
    avatar = _avatar_with_photos(api, user_photos, count=1)
    drain()
    pushed = sim.media_checks()[0]
    assert [d["status_code"] for d in pushed["deliveries"]] == [500, 200] and pushed["status"] == "delivered"
    assert _avatar(api, avatar["id"])["photos"][0]["content_check"] == "pass"


def test_a_verdict_wechat_could_not_reach_is_submitted_again(login, user_photos, services, sim, drain):
    api = login("erin")
    sim.media_check_rule("pass", openid=sim.openid_of("erin"), count=1, errcode=-1008)
    avatar = _avatar_with_photos(api, user_photos, count=1)
    drain()
    check = _checks(services, avatar_id=avatar["id"])[0]
    assert check["state"] == "pass" and check["errors"] == 1 and check["submissions"] == 2


# --- portraits ----------------------------------------------------------------------------------



@pytest.fixture
def trained(paid_avatar, drain, services):
    def _make(name: str):
        api, avatar, order = paid_avatar(name)
        drain()
        assert _avatar(api, avatar["id"])["state"] == "trained"
        return api, avatar, order

    return _make


def _render(api, avatar_id: str) -> dict:
    created = api.post("/api/v1/renders", json={"avatar_id": avatar_id, "template_id": "urban_neon_night"})
    assert created.status_code == 201, created.get_json()
    return created.get_json()


def _order(services, order_id: str) -> dict:
    return services.db.orders.find_one({"_id": order_id})


def test_a_portrait_is_delivered_only_once_it_passes(trained, services, sim, drain):
    api, avatar, order = trained("gina")
    sim.media_check_rule("pass", openid=sim.openid_of("gina"), hold=True)
    render = _render(api, avatar["id"])
    drain()
    done = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert done["state"] == "done" and len(done["images"]) == 2
    assert {i["content_check"] for i in done["images"]} == {"pending"}
    assert_error(api.get(done["images"][0]["url"]), 409, "image_pending_check")
    assert_error(api.get(done["images"][0]["poster_url"]), 409, "image_pending_check")
    assert _order(services, order["id"])["state"] == "paid"  # nothing delivered yet
    assert sweeper.sweep(services).get("order_fulfilled") is None
    assert not [m for m in sim.messages() if m["template_id"] == "tmpl_portraits_ready"]

    sim.flush_media_checks(include_held=True)
    delivered = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert {i["content_check"] for i in delivered["images"]} == {"pass"}
    download = api.get(delivered["images"][0]["url"])
    assert download.status_code == 200 and download.mimetype == "image/jpeg" and download.data.startswith(b"\xff\xd8")
    assert _order(services, order["id"])["state"] == "fulfilled"


def test_a_risky_portrait_is_withheld_and_its_set_redrawn_once(trained, services, sim, drain):
    api, avatar, order = trained("hana")
    credits = _order(services, order["id"])["render_credits"]
    sim.media_check_rule("risky", openid=sim.openid_of("hana"), count=1)
    render = _render(api, avatar["id"])
    drain()
    stored = services.db.renders.find_one({"_id": render["id"]})
    assert len(stored["refused_image_ids"]) == 1
    risky_id = stored["refused_image_ids"][0]
    shown = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert [i["id"] for i in shown["images"]] == [i for i in stored["image_ids"] if i != risky_id]
    assert_error(api.get(f"/api/v1/images/{risky_id}"), 404, "image_not_found")
    assert not services.blobs.exists(keys.image(api.user_id, risky_id))
    # The set is drawn again once, free; its portraits pass.
    redraw = services.db.renders.find_one({"rerender_of": render["id"]})
    assert redraw is not None and redraw["state"] == "done" and not redraw["charged"]
    assert stored["content_rerender"] == redraw["_id"]
    assert len(services.db.images.distinct("_id", {"render_id": redraw["_id"], "content_check": "pass"})) == 2
    assert _order(services, order["id"])["render_credits"] == credits - 1
    assert _order(services, order["id"])["state"] == "fulfilled"  # the passed ones are delivered
    # Exactly once: applying it again, or a sweep, draws nothing more.
    assert renders.make_good_lost_images(services, stored) == "already_made_good"
    sweeper.sweep(services)
    assert services.db.renders.count_documents({"order_id": order["id"]}) == 2


def test_a_redraw_that_loses_portraits_too_gives_the_credit_back_once(trained, services, sim, drain):
    api, avatar, order = trained("ivy")
    credits = _order(services, order["id"])["render_credits"]
    sim.media_check_rule("risky", openid=sim.openid_of("ivy"))  # everything this user's sets draw is risky
    render = _render(api, avatar["id"])
    assert _order(services, order["id"])["render_credits"] == credits - 1
    drain()
    redraw = services.db.renders.find_one({"rerender_of": render["id"]})
    assert redraw is not None and len(redraw["refused_image_ids"]) == 2
    assert services.db.renders.count_documents({"order_id": order["id"]}) == 2  # no third draw
    after = _order(services, order["id"])
    assert after["render_credits"] == credits and after["credited_renders"] == [render["id"]]
    assert after["state"] == "paid"  # nothing was delivered
    assert api.get(f"/api/v1/renders/{render['id']}").get_json()["images"] == []
    assert renders.make_good_lost_images(services, redraw) == "already_made_good"
    sweeper.sweep(services)
    assert _order(services, order["id"])["render_credits"] == credits
