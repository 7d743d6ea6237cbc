"""Subscribe messages through wechatpy against the simulator: counted grants, refusals, WeChat down."""
from __future__ import annotations

import pytest

from datetime import timedelta

from jobs.notifications import send_message
from miniapp_api.dev.embedded import DEFAULT_SUBSCRIBE_TEMPLATES as TEMPLATES
from portraits import keys, notifications, states, sweeper
from tests.test_queue import quick_paid_avatar


def grant(api, sim, name: str, kinds, count: int = 1):
    """The user accepts in wx.requestSubscribeMessage: WeChat remembers it, and the client reports it to us."""
    openid = sim.openid_of(name)
    for kind in kinds:
        sim.grant_subscription(openid, TEMPLATES[kind], count=count)
    for _ in range(count):
        reported = api.post("/api/v1/subscriptions", json={"grants": {TEMPLATES[k]: "accept" for k in kinds}})
        assert reported.status_code == 200, reported.get_json()
    return reported.get_json()["subscriptions"]


def owe(services, user_id: str, kind: str, about: str) -> str:
    """What a state change does: owe the message (and queue its job); its id."""
    notifications.notify(services, user_id, kind, about, {"avatar_id": about})
    return keys.message_id(kind, about)


def sent(sim, template_id):
    return [m for m in sim.messages() if m["template_id"] == template_id]


def test_training_started_avatar_ready_and_portraits_ready_are_sent(services, login, sim, drain):
    api = login("gina")
    assert grant(api, sim, "gina", ["training_started", "avatar_ready", "portraits_ready"]) == {
        TEMPLATES[k]: 1 for k in ("training_started", "avatar_ready", "portraits_ready")}
    avatar, order = quick_paid_avatar(services, api, sim)
    drain()
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"
    openid = sim.openid_of("gina")
    for kind in ("training_started", "avatar_ready"):
        [message] = sent(sim, TEMPLATES[kind])
        assert message["touser"] == openid and message["data"]["character_string2"]["value"] == avatar["_id"]
    template = next(t for t in api.get("/api/v1/templates?gender=female").get_json())
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["_id"], "template_id": template["id"]})
    drain()
    [message] = sent(sim, TEMPLATES["portraits_ready"])
    assert message["data"]["character_string2"]["value"] == render.get_json()["id"]
    # One-time grants were consumed, one each.
    assert all(v == 0 for v in services.db.users.find_one({"_id": api.user_id})["subscriptions"].values())


@pytest.mark.parametrize("settings_overrides", [{"fault_train_failures": 99, "train_retries": 0}])
def test_refund_message_is_sent_once_the_refund_is_made(services, login, sim, drain):
    api = login("hana")
    grant(api, sim, "hana", ["refund_made"])
    avatar, order = quick_paid_avatar(services, api, sim)
    drain()
    assert sent(sim, TEMPLATES["refund_made"]) == []  # asked for, not yet made
    sim.settle_refunds()
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "refunded"
    drain()
    [message] = sent(sim, TEMPLATES["refund_made"])
    assert message["data"]["character_string2"]["value"] == order["id"]


def test_refused_and_exhausted_grants(services, login, sim):
    api = login("ivan")
    kind = "avatar_ready"
    # No grant reported: nothing is sent, nothing asked of WeChat.
    assert send_message(owe(services, api.user_id, kind, "a0")) == "no_grant"
    # We were told "accept" but WeChat holds no grant (43101): our count is cleared, the job does not fail.
    api.post("/api/v1/subscriptions", json={"grants": {TEMPLATES[kind]: "accept"}})
    api.post("/api/v1/subscriptions", json={"grants": {TEMPLATES[kind]: "accept"}})
    assert send_message(owe(services, api.user_id, kind, "a1")) == "refused"
    assert services.db.users.find_one({"_id": api.user_id})["subscriptions"][TEMPLATES[kind]] == 0
    assert sent(sim, TEMPLATES[kind]) == []
    # Two grants, three messages: the third finds the grant exhausted.
    grant(api, sim, "ivan", [kind], count=2)
    assert [send_message(owe(services, api.user_id, kind, f"b{i}")) for i in range(3)] == ["sent", "sent", "no_grant"]
    assert len(sent(sim, TEMPLATES[kind])) == 2
    # "reject" and "ban" clear the count; an unknown answer is refused.
    grant(api, sim, "ivan", [kind])
    assert api.post("/api/v1/subscriptions", json={"grants": {TEMPLATES[kind]: "ban"}}).get_json()[
        "subscriptions"][TEMPLATES[kind]] == 0
    bad = api.post("/api/v1/subscriptions", json={"grants": {TEMPLATES[kind]: "maybe"}})
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_grants"


def test_wechat_down_never_fails_the_training_and_the_grant_is_kept(services, login, sim, drain):
    from portraits.gateways.wechat import WeChatUnavailable

    api = login("jack")
    grant(api, sim, "jack", ["training_started", "avatar_ready"])
    sim.set_fault("/cgi-bin/message/subscribe/send", "5xx", count=3)  # the two sends of the job, and ours
    avatar, _ = quick_paid_avatar(services, api, sim)
    drain()
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"
    assert sim.messages() == []
    subscriptions = services.db.users.find_one({"_id": api.user_id})["subscriptions"]
    assert subscriptions[TEMPLATES["avatar_ready"]] == 1  # given back for the retry
    message_id = keys.message_id("avatar_ready", avatar["_id"])
    assert services.db.messages.find_one({"_id": message_id})["state"] == "owed"  # still owed, for the retry
    with pytest.raises(WeChatUnavailable):
        send_message(message_id)
    assert send_message(message_id) == "sent"
    assert send_message(message_id) == "not_owed"  # the job's own retry, later, sends nothing more
    assert len(sent(sim, TEMPLATES["avatar_ready"])) == 1


def test_a_message_is_owed_once_and_sent_once_however_often_it_is_replayed(services, login, sim, drain):
    api = login("kate")
    grant(api, sim, "kate", ["avatar_ready"], count=3)
    message_id = owe(services, api.user_id, "avatar_ready", "av_1")
    assert owe(services, api.user_id, "avatar_ready", "av_1") == message_id  # the step replayed after a crash
    assert services.db.messages.count_documents({}) == 1
    drain()
    assert send_message(message_id) == "not_owed"
    assert len(sent(sim, TEMPLATES["avatar_ready"])) == 1
    assert services.db.users.find_one({"_id": api.user_id})["subscriptions"][TEMPLATES["avatar_ready"]] == 2


def later(services, monkeypatch):
    """The domain's clock moved past the sweep's grace for work in a live process's hands."""
    real = states.now
    monkeypatch.setattr(states, "now", lambda: real() + past_the_grace(services))


def past_the_grace(services) -> timedelta:
    return timedelta(seconds=services.settings.worker_dead_after_s * 3)


def test_the_sweep_queues_again_a_message_redis_lost(services, login, sim, drain, monkeypatch):
    api = login("liam")
    grant(api, sim, "liam", ["avatar_ready"])
    message_id = owe(services, api.user_id, "avatar_ready", "av_2")
    services.redis.flushall()
    drain()
    assert sent(sim, TEMPLATES["avatar_ready"]) == []
    later(services, monkeypatch)
    assert sweeper.sweep(services)["message_requeued"] == 1
    drain()
    assert services.db.messages.find_one({"_id": message_id})["state"] == "sent"
    assert len(sent(sim, TEMPLATES["avatar_ready"])) == 1
    assert "message_requeued" not in sweeper.sweep(services)


def test_the_sweep_owes_a_message_a_crash_never_recorded_and_never_resends_an_interrupted_one(
        services, login, sim, drain, monkeypatch):
    api = login("mona")
    grant(api, sim, "mona", ["training_started", "avatar_ready"])
    avatar, _ = quick_paid_avatar(services, api, sim)
    # The process died between the avatar's `trained` and the message being owed (or Redis lost the job).
    services.redis.flushall()
    drain()
    services.db.messages.delete_many({})
    services.db.avatars.update_one({"_id": avatar["_id"]}, {"$set": {"state": "trained", "trained_at": states.now()}})
    later(services, monkeypatch)
    assert sweeper.sweep(services)["message_owed"] == 1
    drain()
    [message] = sent(sim, TEMPLATES["avatar_ready"])
    assert message["data"]["character_string2"]["value"] == avatar["_id"]
    # A sender that died between taking the grant and recording WeChat's answer: maybe sent; never sent again.
    interrupted = owe(services, api.user_id, "training_started", "av_3")
    long_ago = states.now() - past_the_grace(services)
    services.db.messages.update_one({"_id": interrupted}, {"$set": {"state": "sending", "sending_at": long_ago}})
    assert sweeper.sweep(services)["message_interrupted"] == 1
    drain()
    assert services.db.messages.find_one({"_id": interrupted})["state"] == "interrupted"
    assert sent(sim, TEMPLATES["training_started"]) == []
