"""MongoDB records the work owed; the sweep (portraits.sweeper) heals whatever a lost Redis or a step that never
happened left behind, and does nothing twice.

Each test makes one step fail the way a crash between two writes would (the step raises, so what came before it is
written and what comes after is not), then lets the sweep finish the work.
"""
from __future__ import annotations

from datetime import timedelta

import pytest

from portraits import keys, photos, renders, states, sweeper, tasks
from portraits import avatars as avatars_module
from portraits.billing import orders as orders_module
from portraits.billing import refunds as refunds_module
from portraits.queue.tracking import QueueTracker
from tests.test_notifications import later
from tests.test_queue import quick_paid_avatar


class Crash(RuntimeError):
    """The process dying at this point: nothing after it happens."""


def crash_once(monkeypatch, module, name: str):
    real = getattr(module, name)
    calls = []

    def crashing(*args, **kwargs):
        if not calls:
            calls.append(args)
            raise Crash(f"{name} never happened")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)
    return calls


def test_after_redis_loses_its_data_paid_avatars_are_queued_again_in_payment_order(services, login, sim, drain):
    paid = [quick_paid_avatar(services, login(f"payer{i}"), sim)[0] for i in range(3)]
    # Paid in the opposite order of their creation: the rebuilt line follows the payments.
    at = states.now()
    for rank, avatar in enumerate(reversed(paid)):
        services.db.orders.update_one({"_id": avatar["order_id"]}, {"$set": {"paid_at": at + timedelta(seconds=rank)}})
    services.redis.flushall()

    # The paid avatars' previews were lost with Redis too (portraits.previews).
    assert sweeper.sweep(services) == {"training_requeued": 3, "preview_requeued": 3}
    assert sweeper.sweep(services) == {}  # nothing owed twice
    tracker = QueueTracker(services.redis)
    positions = [tracker.position(tasks.TRAIN, keys.train_job_id(a["_id"], 1))["position"] for a in paid]
    assert positions == [2, 1, 0]
    drain()
    assert [services.db.avatars.find_one({"_id": a["_id"]})["state"] for a in paid] == ["trained"] * 3


def test_the_queue_poll_of_a_paying_user_never_answers_404_after_a_redis_loss(services, login, sim):
    api = login("patient")
    avatar, _ = quick_paid_avatar(services, api, sim)
    services.redis.flushall()
    poll = api.get(f"/api/v1/avatars/{avatar['_id']}/queue")
    assert poll.status_code == 200, poll.get_json()
    assert poll.get_json()["state"] == "queued" and poll.get_json()["position"] == 0
    assert tasks.job_status(services, keys.train_job_id(avatar["_id"], 1)) == "queued"  # queued again on the spot
    assert sweeper.sweep(services) == {"preview_requeued": 1}  # the preview's job was lost too; the poll queues none


def test_a_just_created_avatar_polls_as_collecting_and_a_stranger_gets_404(services, login):
    owner, stranger = login("owner"), login("stranger")
    avatar = owner.post("/api/v1/avatars", json={"gender": "male"}).get_json()
    poll = owner.get(f"/api/v1/avatars/{avatar['id']}/queue")
    assert poll.status_code == 200 and poll.get_json()["state"] == "collecting"
    assert stranger.get(f"/api/v1/avatars/{avatar['id']}/queue").status_code == 404


def test_a_payment_whose_training_never_started_is_started_by_the_sweep(services, login, sim, drain, monkeypatch):
    crashed = crash_once(monkeypatch, avatars_module, "start_training")
    api = login("bob")
    with pytest.raises(AssertionError):
        quick_paid_avatar(services, api, sim)  # the payment lands; the avatar stays ready
    assert crashed
    order = services.db.orders.find_one({"user_id": api.user_id})
    assert order["state"] == "paid"
    assert services.db.avatars.find_one({"_id": order["avatar_id"]})["state"] == "ready"
    assert sweeper.sweep(services) == {"training_started": 1, "preview_requested": 1}
    drain()
    assert services.db.avatars.find_one({"_id": order["avatar_id"]})["state"] == "trained"


@pytest.mark.parametrize("settings_overrides", [{"fault_train_failures": 99, "train_retries": 0}])
def test_a_failed_training_whose_refund_was_never_asked_for_is_refunded_once(services, login, sim, drain,
                                                                              monkeypatch):
    crash_once(monkeypatch, refunds_module, "request_refund")
    avatar, order = quick_paid_avatar(services, login("carol"), sim)
    drain()
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "failed"
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "paid"
    assert sweeper.sweep(services) == {"refund_requested": 1}
    assert sweeper.sweep(services) == {}
    drain()
    settled = services.db.orders.find_one({"_id": order["id"]})
    assert [r["out_refund_no"] for r in settled["refunds"]] == [refunds_module.refund_number(order["id"])]


def test_a_training_whose_job_redis_lost_while_it_ran_is_retried(services, login, sim, drain):
    avatar, _ = quick_paid_avatar(services, login("dave"), sim)
    job_id = keys.train_job_id(avatar["_id"], 1)
    states.transition(services.db, "avatar", avatar["_id"], "training", expect={"queued"}, by=f"job:{job_id}",
                      inc={"train_attempts": 1})
    services.redis.flushall()  # the job and its worker's records are gone
    # Within the grace a live worker could still be on it; the preview's job, only queued, is queued again.
    assert sweeper.sweep(services) == {"preview_requeued": 1}
    old = states.now() - timedelta(seconds=services.settings.worker_dead_after_s * 3)
    services.db.avatars.update_one({"_id": avatar["_id"]}, {"$set": {"updated_at": old}})
    assert sweeper.sweep(services) == {"training_retried": 1}
    drain()
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"


def test_a_trained_avatar_whose_photo_purge_never_happened_is_purged(services, login, sim, drain, monkeypatch):
    crash_once(monkeypatch, photos, "purge_avatar_photos")
    avatar, _ = quick_paid_avatar(services, login("erin"), sim)
    drain()
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["state"] == "trained" and "photos_purged_at" not in stored
    # The crash came before the "avatar ready" message was owed, too: the sweep owes it.
    assert sweeper.sweep(services) == {"photos_purged": 1, "message_owed": 1}
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["photos_purged_at"] and not any(p.get("crop_key") for p in stored["photos"])
    assert list(services.blobs.keys(f"users/{stored['user_id']}/avatars/{avatar['_id']}/photos/")) == []


def _render_on_trained_avatar(services, login, sim, drain, name: str) -> tuple[dict, str]:
    avatar, order = quick_paid_avatar(services, login(name), sim)
    drain()
    template = next(t for t in services.catalog if t.gender == "female")
    render = renders.create_render(services, services.db.users.find_one({"_id": avatar["user_id"]}),
                                   services.db.avatars.find_one({"_id": avatar["_id"]}), template.id)
    return render, order["id"]


def test_a_delivered_render_whose_order_was_never_fulfilled_is_fulfilled(services, login, sim, drain, monkeypatch):
    render, order_id = _render_on_trained_avatar(services, login, sim, drain, "frank")
    # The portraits are delivered when WeChat's content-check verdicts land; the process crashes each time it is
    # about to fulfil the order (and WeChat does not push the verdicts again).
    sim.configure_media_checks(push_retries=0)
    real_fulfil, crashing = orders_module.fulfil, [True]

    def fulfil(*args):
        if crashing[0]:
            raise Crash("fulfil never happened")
        return real_fulfil(*args)

    monkeypatch.setattr(orders_module, "fulfil", fulfil)
    drain()
    crashing[0] = False
    assert services.db.renders.find_one({"_id": render["_id"]})["state"] == "done"
    assert services.db.orders.find_one({"_id": order_id})["state"] == "paid"
    images = len(services.db.renders.find_one({"_id": render["_id"]})["image_ids"])
    # The crash came before the verdicts were settled and the "portraits ready" message owed: the sweep does both.
    assert sweeper.sweep(services) == {"order_fulfilled": 1, "content_check_settled": images}
    assert services.db.orders.find_one({"_id": order_id})["state"] == "fulfilled"
    assert services.db.messages.count_documents({"_id": f"portraits_ready-{render['_id']}"}) == 1
    assert sweeper.sweep(services) == {}


@pytest.mark.parametrize("settings_overrides", [{"fault_render_failures": 99, "render_retries": 0}])
def test_a_failed_render_whose_credit_never_came_back_gets_it_once(services, login, sim, drain, monkeypatch):
    render, order_id = _render_on_trained_avatar(services, login, sim, drain, "grace")
    credits = services.db.orders.find_one({"_id": order_id})["render_credits"]
    crash_once(monkeypatch, renders, "settle_failed_render")
    drain()
    assert services.db.renders.find_one({"_id": render["_id"]})["state"] == "failed"
    assert services.db.orders.find_one({"_id": order_id})["render_credits"] == credits
    assert sweeper.sweep(services) == {"render_settled": 1}
    assert sweeper.sweep(services) == {}
    assert services.db.orders.find_one({"_id": order_id})["render_credits"] == credits + 1
    renders.settle_failed_render(services, services.db.renders.find_one({"_id": render["_id"]}))  # replayed
    assert services.db.orders.find_one({"_id": order_id})["render_credits"] == credits + 1


def test_a_render_credit_claimed_for_a_render_never_written_comes_back_once(services, login, sim, drain,
                                                                            monkeypatch):
    avatar, order = quick_paid_avatar(services, login("hugo"), sim)
    drain()
    credits = services.db.orders.find_one({"_id": order["id"]})["render_credits"]
    user = services.db.users.find_one({"_id": avatar["user_id"]})
    template = next(t for t in services.catalog if t.gender == "female")
    # The process dies between taking the credit and writing the render: the claim is all that is left.
    monkeypatch.setattr(renders, "_insert_claimed", lambda *args: (_ for _ in ()).throw(Crash("died")))
    with pytest.raises(Crash):
        renders.create_render(services, user, services.db.avatars.find_one({"_id": avatar["_id"]}), template.id)
    monkeypatch.undo()
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["render_credits"] == credits - 1 and len(stored["render_claims"]) == 1
    assert "claim_given_back" not in sweeper.sweep(services)  # a live request could still be between the writes
    later(services, monkeypatch)
    assert sweeper.sweep(services).get("claim_given_back") == 1
    assert sweeper.sweep(services).get("claim_given_back") is None
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["render_credits"] == credits and stored["render_claims"] == []


def test_a_claim_whose_render_was_written_is_dropped_and_costs_the_credit(services, login, sim, drain, monkeypatch):
    avatar, order = quick_paid_avatar(services, login("iris"), sim)
    drain()
    credits = services.db.orders.find_one({"_id": order["id"]})["render_credits"]
    crash_once(monkeypatch, renders, "drop_claim")  # dies right after the render is written and queued
    template = next(t for t in services.catalog if t.gender == "female")
    with pytest.raises(Crash):
        renders.create_render(services, services.db.users.find_one({"_id": avatar["user_id"]}),
                              services.db.avatars.find_one({"_id": avatar["_id"]}), template.id)
    later(services, monkeypatch)
    assert sweeper.sweep(services).get("claim_dropped") == 1
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["render_credits"] == credits - 1 and stored["render_claims"] == []
    drain()
    assert services.db.renders.find_one({"order_id": order["id"]})["state"] == "done"


def test_more_like_me_claimed_but_never_written_gives_the_refinement_back(services, login, sim, drain, monkeypatch):
    render, _ = _render_on_trained_avatar(services, login, sim, drain, "jade")
    drain()
    parent = services.db.renders.find_one({"_id": render["_id"]})
    monkeypatch.setattr(renders, "insert_render", lambda *args, **kwargs: (_ for _ in ()).throw(Crash("died")))
    monkeypatch.setattr(renders, "give_back_claim", lambda *args: (_ for _ in ()).throw(Crash("died too")))
    with pytest.raises(Crash):
        renders.more_like_me(services, parent, services.db.avatars.find_one({"_id": parent["avatar_id"]}))
    monkeypatch.undo()
    assert services.db.renders.find_one({"_id": parent["_id"]})["refinements_used"] == 1
    later(services, monkeypatch)
    assert sweeper.sweep(services).get("claim_given_back") == 1
    root = services.db.renders.find_one({"_id": parent["_id"]})
    assert root["refinements_used"] == 0 and root["refinement_claims"] == []


@pytest.mark.parametrize("settings_overrides", [{"fault_render_failures": 1, "render_retries": 0}])
def test_an_operator_retry_never_written_frees_the_failed_render(services, login, sim, drain, monkeypatch):
    render, _ = _render_on_trained_avatar(services, login, sim, drain, "kurt")
    drain()
    failed = services.db.renders.find_one({"_id": render["_id"]})
    assert failed["state"] == "failed"
    monkeypatch.setattr(renders, "insert_render", lambda *args, **kwargs: (_ for _ in ()).throw(Crash("died")))
    monkeypatch.setattr(renders, "give_back_claim", lambda *args: (_ for _ in ()).throw(Crash("died too")))
    with pytest.raises(Crash):
        renders.retry_failed_render(services, failed, by="operator:ada")
    monkeypatch.undo()
    later(services, monkeypatch)
    done = sweeper.sweep(services)
    assert done.get("retry_released") == 1 and done.get("claim_given_back") == 1
    retried = renders.retry_failed_render(services, services.db.renders.find_one({"_id": render["_id"]}),
                                          by="operator:ada")
    assert retried["state"] == "queued" and retried["retry_of"] == render["_id"]
    assert services.db.orders.find_one({"_id": render["order_id"]})["render_claims"] == []


def test_a_finished_render_whose_content_checks_were_never_recorded_gets_them_from_the_sweep(
        services, login, sim, drain, monkeypatch):
    render, order_id = _render_on_trained_avatar(services, login, sim, drain, "jade")
    crash_once(monkeypatch, renders, "request_image_checks")  # dies right after the render is written done
    drain()
    stored = services.db.renders.find_one({"_id": render["_id"]})
    assert stored["state"] == "done" and stored["image_checks_owed"] is True
    assert services.db.content_checks.count_documents({"render_id": render["_id"]}) == 0
    assert "content_check_recorded" not in sweeper.sweep(services)  # a live worker could still be between the writes
    later(services, monkeypatch)
    healed = sweeper.sweep(services)
    images = len(stored["image_ids"])
    assert healed["content_check_recorded"] == 1 and healed["content_check_submitted"] == images
    assert "image_checks_owed" not in services.db.renders.find_one({"_id": render["_id"]})
    sim.flush_media_checks()
    assert services.db.orders.find_one({"_id": order_id})["state"] == "fulfilled"
    assert "content_check_recorded" not in sweeper.sweep(services)
