"""The express tier (issue 17 part 1): its own GPU lane with a share of the workers and a cap, per-lane position and
ETA, and an express order whose promised wait is broken gets the price difference back exactly once."""
from __future__ import annotations

import math
from datetime import timedelta

import pytest

from jobs.worker import drain as drain_queues
from portraits import states, sweeper, tasks
from portraits.billing import promises, refunds
from portraits.queue.lanes import EXPRESS, STANDARD, ExpressSlots, LanePolicy
from portraits.queue.tracking import QueueTracker, estimate
from tests.console_support import client_login, make_operator
from tests.test_queue import quick_paid_avatar, record
from tests.test_xpay import XPAY_RAIL, pay, pushes  # noqa: F401  (pushes: a fixture the iOS test uses)

EXPRESS_SKU = "express_pack"


def _queue_jobs(services, name: str, tags: list[str]) -> None:
    for tag in tags:
        tasks.enqueue(services, name, record, tag, job_id=f"{name}-{tag}-1", subject=f"avatar:{tag}")


def _ran(services) -> list[str]:
    return [raw.decode() for raw in services.redis.lrange("test:ran", 0, -1)]


# ------------------------------------------------------------------------------------------------ the scheduler


def test_an_express_job_is_served_before_standard_jobs_queued_earlier(services):
    """Two live GPU workers: one express slot. The standard jobs were queued first; express goes first anyway."""
    QueueTracker(services.redis).worker_alive(tasks.GPU_QUEUES, "gpu-elsewhere", ttl_s=60)
    _queue_jobs(services, tasks.TRAIN, ["s1", "s2"])
    _queue_jobs(services, tasks.RENDER, ["sr"])
    _queue_jobs(services, tasks.TRAIN_EXPRESS, ["e1"])
    _queue_jobs(services, tasks.RENDER_EXPRESS, ["er"])
    drain_queues(services)
    # Within each lane renders before trainings; the express lane before the standard one.
    assert _ran(services) == ["er", "e1", "sr", "s1", "s2"]


def test_standard_work_progresses_under_an_express_flood(services):
    """The cap: the one express slot of two workers is held by the other worker, so this one takes standard work
    first although express jobs were queued before it."""
    QueueTracker(services.redis).worker_alive(tasks.GPU_QUEUES, "gpu-elsewhere", ttl_s=60)
    ExpressSlots(services.redis).hold("gpu-elsewhere", 60, EXPRESS)  # busy with an express job
    _queue_jobs(services, tasks.TRAIN_EXPRESS, [f"e{i}" for i in range(4)])
    _queue_jobs(services, tasks.TRAIN, ["s1", "s2"])
    drain_queues(services)
    assert _ran(services) == ["s1", "s2", "e0", "e1", "e2", "e3"]


def test_one_gpu_takes_turns_between_the_lanes_while_both_wait(services):
    """One worker: floor(cap × 1) = 0 whole workers for express, so the lanes alternate; express is still first and
    standard is never starved by a flood of express orders."""
    _queue_jobs(services, tasks.TRAIN, ["s1", "s2"])
    _queue_jobs(services, tasks.TRAIN_EXPRESS, [f"e{i}" for i in range(5)])
    drain_queues(services)
    assert _ran(services) == ["e0", "s1", "e1", "s2", "e2", "e3", "e4"]


@pytest.mark.parametrize("live", [1, 2, 3, 4, 7, 10, 40])
def test_the_share_and_the_cap_of_express_workers(live):
    policy = LanePolicy(share=0.25, cap=0.5)
    slots = policy.express_slots(live)
    assert slots >= 1 and slots <= max(1, live // 2)
    if live >= 2:
        assert slots == min(math.ceil(0.25 * live), live // 2)
        # Under an express flood the standard lane keeps every worker but the express slots.
        assert policy.lane_workers(STANDARD, live, express_demand=10_000, standard_demand=5) == live - slots
    else:
        assert policy.alternates(live)
        assert policy.lane_workers(STANDARD, live, express_demand=10_000, standard_demand=5) == 0.5
    # Nothing standard waiting: express has every worker (no GPU idles while anything waits).
    assert policy.lane_workers(EXPRESS, live, express_demand=50, standard_demand=0) == live


def test_the_slot_script_applies_the_rule_the_policy_states(services):
    """The Lua that claims a slot atomically and the Python rule the bench simulates agree, case by case."""
    slots = ExpressSlots(services.redis)
    standard_list = tasks.queue(services, tasks.TRAIN).key
    policy = LanePolicy(share=0.25, cap=0.5)
    for live in (1, 2, 4):
        for busy in range(3):
            for last in (None, STANDARD, EXPRESS):
                for standard_waiting in (0, 2):
                    services.redis.delete("portraits:lanes:express-busy", "portraits:lanes:last-started",
                                          standard_list)
                    for i in range(busy):
                        slots.hold(f"other-{i}", 60, EXPRESS)
                    if last is None:
                        services.redis.delete("portraits:lanes:last-started")
                    else:
                        services.redis.set("portraits:lanes:last-started", last)
                    for i in range(standard_waiting):
                        services.redis.rpush(standard_list, f"job-{i}")
                    expected = policy.may_take_express_first(busy, False, standard_waiting, last, live)
                    assert slots.take(policy, "me", live, 60, [standard_list]) == expected, (live, busy, last,
                                                                                              standard_waiting)
    services.redis.delete(standard_list)


# ------------------------------------------------------------------------------------------- position and ETA


def test_position_and_eta_are_per_lane(services):
    tracker = QueueTracker(services.redis, LanePolicy(share=0.25, cap=0.5))
    for name in ("gpu-1", "gpu-2", "gpu-3", "gpu-4"):
        tracker.worker_alive(tasks.GPU_QUEUES, name, ttl_s=60)
    tracker.record_duration(tasks.TRAIN, 400.0)
    tracker.record_duration(tasks.TRAIN_EXPRESS, 300.0)
    _queue_jobs(services, tasks.TRAIN, [f"s{i}" for i in range(6)])
    _queue_jobs(services, tasks.TRAIN_EXPRESS, ["e0", "e1", "e2"])
    # Express: only express jobs count as ahead; one slot of four workers (standard work waits).
    express = tracker.position(tasks.TRAIN_EXPRESS, f"{tasks.TRAIN_EXPRESS}-e2-1")
    assert express["position"] == 2 and express["lane"] == EXPRESS
    assert express["eta_seconds"] == estimate(2, 300.0, 1, 0, False, 0.0)["eta_seconds"] == 900
    # Standard: its own line, on the three workers the express slot leaves.
    standard = tracker.position(tasks.TRAIN, f"{tasks.TRAIN}-s5-1")
    assert standard["position"] == 5 and standard["lane"] == STANDARD
    assert standard["eta_seconds"] == estimate(5, 400.0, 3, 0, False, 0.0)["eta_seconds"] == 800
    # The poll answered from memory says the same as the script.
    for tag, name in (("e2", tasks.TRAIN_EXPRESS), ("s5", tasks.TRAIN)):
        _, where = tracker.poll(f"avatar:{tag}")
        assert where == tracker.position(name, f"{name}-{tag}-1")


def test_an_express_avatar_polls_its_own_lane_and_the_order_carries_its_promise(services, login, sim):
    for name in ("bob", "carol"):
        quick_paid_avatar(services, login(name), sim)
    api = login("dora")
    avatar, order = quick_paid_avatar(services, api, sim, sku=EXPRESS_SKU)
    polled = api.get(f"/api/v1/avatars/{avatar['_id']}/queue").get_json()
    assert polled["lane"] == EXPRESS and polled["position"] == 0  # two standard avatars paid earlier
    assert api.get(f"/api/v1/avatars/{avatar['_id']}").get_json()["queue"]["lane"] == EXPRESS
    shown = api.get(f"/api/v1/orders/{order['id']}").get_json()
    product = services.settings.skus[EXPRESS_SKU]
    difference = product["amount"] - services.settings.skus["avatar_pack"]["amount"]
    assert shown["lane"] == EXPRESS and shown["amount"] == product["amount"]
    assert shown["promise"]["state"] == "open" and shown["promise"]["wait_s"] == product["promised_wait_s"]
    assert shown["promise"]["difference_fen"] == difference and shown["promise"]["deadline"]
    listed = {p["sku"]: p for p in api.get("/api/v1/products").get_json()}
    assert listed[EXPRESS_SKU]["lane"] == EXPRESS and listed["avatar_pack"]["lane"] == STANDARD
    assert listed[EXPRESS_SKU]["promised_wait_s"] == product["promised_wait_s"]


# ------------------------------------------------------------------------------------------ the broken promise


def _past_the_breach(services, order_id: str, monkeypatch) -> None:
    """The domain's clock moved past the order's deadline plus the margin."""
    breach_at = services.db.orders.find_one({"_id": order_id})["promise"]["breach_at"]
    real = states.now
    shift = breach_at - real() + timedelta(seconds=1)
    monkeypatch.setattr(states, "now", lambda: real() + shift)


def test_a_kept_promise_refunds_nothing(services, login, sim, drain):
    avatar, order = quick_paid_avatar(services, login("erin"), sim, sku=EXPRESS_SKU)
    drain()
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["promise"]["state"] == "kept" and stored["refunds"] == []
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"


def test_a_broken_promise_refunds_the_difference_exactly_once(services, login, sim, drain, monkeypatch):
    api = login("fay")
    avatar, order = quick_paid_avatar(services, api, sim, sku=EXPRESS_SKU)
    _past_the_breach(services, order["id"], monkeypatch)
    first = sweeper.sweep(services)
    assert first.get("promise_refunded") == 1
    assert "promise_refunded" not in sweeper.sweep(services)  # the check run again gives nothing more
    assert promises.compensate(services, order["id"], by="test") == "none"
    drain()  # the refund job; the training too (the promise is already settled: broken, still waiting)
    sim.settle_refunds()  # WeChat Pay's refund callback
    stored = services.db.orders.find_one({"_id": order["id"]})
    difference = stored["promise"]["difference_fen"]
    assert [(r["out_refund_no"], r["amount"], r["state"]) for r in stored["refunds"]] == [
        (refunds.promise_refund_number(order["id"]), difference, "SUCCESS")]
    assert stored["promise"]["state"] == "compensated" and stored["promise"]["compensation"]["kind"] == "refund"
    assert stored["state"] in ("paid", "fulfilled")  # a partial refund: the order goes on
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"
    shown = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert shown["promise"]["compensation"] == "refund" and shown["refunds"][0]["amount"] == difference
    # Whatever happens to the order later (its training failing, say), the rest is what a full refund takes.
    assert refunds.refundable_amount(stored) == stored["amount"] - difference


def test_a_promise_broken_by_a_late_start_is_settled_when_the_training_starts(services, login, sim, drain,
                                                                              monkeypatch):
    _, order = quick_paid_avatar(services, login("gus"), sim, sku=EXPRESS_SKU)
    _past_the_breach(services, order["id"], monkeypatch)
    drain()  # the training starts late: broken at the claim, the difference refunded by the refund job
    sim.settle_refunds()
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["promise"]["state"] == "compensated" and stored["promise"]["started_at"] is not None
    assert [(r["out_refund_no"], r["state"]) for r in stored["refunds"]] == [
        (refunds.promise_refund_number(order["id"]), "SUCCESS")]
    assert sweeper.sweep(services).get("promise_refunded") is None


def test_a_crash_between_the_refund_and_the_promise_record_is_healed_without_a_second_refund(
        services, login, sim, drain, monkeypatch):
    _, order = quick_paid_avatar(services, login("hal"), sim, sku=EXPRESS_SKU)
    _past_the_breach(services, order["id"], monkeypatch)
    # The process died right after the refund was recorded, before the promise said so.
    states.transition_part(services.db, "express_promise", order["id"], "broken", by="test", reason="still_waiting")
    difference = services.db.orders.find_one({"_id": order["id"]})["promise"]["difference_fen"]
    assert refunds.request_refund(services, order["id"], reason=promises.REASON, expect=promises.REFUNDABLE_NOW,
                                  amount=difference, out_refund_no=refunds.promise_refund_number(order["id"]))
    drain()
    assert sweeper.sweep(services).get("promise_refunded") == 1  # recorded now; no second refund asked
    assert sweeper.sweep(services).get("promise_refunded") is None
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert len(stored["refunds"]) == 1 and stored["promise"]["state"] == "compensated"
    # Asking for the same numbered refund again adds nothing.
    assert refunds.request_refund(services, order["id"], reason=promises.REASON, expect=promises.REFUNDABLE_NOW,
                                  amount=difference, out_refund_no=refunds.promise_refund_number(order["id"])) is None


@pytest.fixture
def settings_overrides(request):
    return dict(XPAY_RAIL) if "ios" in request.node.name else {}


def test_a_broken_ios_promise_is_made_good_with_a_standard_pack_once(ready_avatar, services, sim, drain,
                                                                    monkeypatch, pushes):  # noqa: F811
    api, avatar = ready_avatar("ivy")
    response = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": EXPRESS_SKU, "platform": "ios"})
    assert response.status_code == 201, response.get_json()
    order = response.get_json()
    pay(sim, services, api, order, "ios")
    _past_the_breach(services, order["id"], monkeypatch)
    assert sweeper.sweep(services).get("promise_made_good") == 1
    assert sweeper.sweep(services).get("promise_made_good") is None
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["refunds"] == [] and stored["promise"]["compensation"]["kind"] == "make_good_credit"
    credits = services.db.users.find_one({"_id": api.user_id})["make_good_credits"]
    assert [(c["order_id"], c["sku"]) for c in credits] == [(f"{order['id']}-express", "avatar_pack")]
    drain()
    # The order itself goes on (its training runs); only a failure would make it good again, separately.
    assert services.db.orders.find_one({"_id": order["id"]})["state"] in ("paid", "fulfilled")


def test_the_openapi_document_describes_lanes_and_promises(client):
    schemas = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    by_name = {name.split(".")[-1]: schema for name, schema in schemas.items()}
    assert "lane" in by_name["Queue"]["properties"] and "lane" in by_name["QueueSpot"]["properties"]
    assert "promise" in by_name["Order"]["properties"]
    assert {"lane", "promised_wait_s"} <= set(by_name["Product"]["properties"])
    assert "compensation" in by_name["ExpressPromise"]["properties"]


def test_the_console_shows_the_lane_and_the_promise(services, client, login, sim, monkeypatch):
    make_operator(services, "vic", "viewer")
    client_login(client, "vic")
    _, order = quick_paid_avatar(services, login("jon"), sim, sku=EXPRESS_SKU)
    page = client.get(f"/console/orders/{order['id']}").get_data(as_text=True)
    assert "加急 express" in page and "open" in page
    _past_the_breach(services, order["id"], monkeypatch)
    sweeper.sweep(services)
    page = client.get(f"/console/orders/{order['id']}").get_data(as_text=True)
    assert "compensated" in page and "补偿 refund ¥10.00" in page
    dashboard = client.get("/console/").get_data(as_text=True)
    assert 'data-queue="train_express"' in dashboard and 'id="eta-new-express"' in dashboard
