"""The simulator's own /sim/ endpoints: act as the user in WeChat (log in, grant subscriptions, pay), deliver and
redeliver callbacks, settle refunds, arm faults, and read back what the app did (and every callback delivery
attempt, automatic redeliveries included: /sim/deliveries)."""
from __future__ import annotations

import secrets
import threading
import time
from datetime import datetime

from flask import Blueprint, request

from wechat_sim.signing import CHINA_TZ, rfc3339_now
from wechat_sim.simulator import FAULT_MODES, current_simulator
from wechat_sim.web import json_response, request_json

blueprint = Blueprint("control", __name__)


@blueprint.post("/sim/login")
def sim_login():
    sim = current_simulator()
    user = (request_json() or {}).get("user")
    if not isinstance(user, str) or not user:
        return json_response({"error": "user_required"}, 400)
    code = secrets.token_urlsafe(24)
    openid = sim.openid_for(user)
    with sim.state.lock:
        sim.state.openid_by_user[user] = openid
        sim.state.login_codes[code] = {"openid": openid, "issued_at": time.time(), "used": False}
    return json_response({"code": code, "openid": openid})


@blueprint.post("/sim/phone_code")
def sim_phone_code():
    """The user taps the getPhoneNumber button and allows it: a code for their phone (country_code "86" unless
    given). `appid` mints the code for another app, whose watermark then names that app."""
    sim = current_simulator()
    payload = request_json() or {}
    user, phone = payload.get("user"), payload.get("phone")
    country_code = str(payload.get("country_code") or "86")
    if not isinstance(user, str) or not user or not isinstance(phone, str) or not phone.isdigit():
        return json_response({"error": "user_and_digits_phone_required"}, 400)
    code = secrets.token_urlsafe(24)
    with sim.state.lock:
        sim.state.phone_codes[code] = {"user": user, "openid": sim.openid_for(user), "phone": phone,
                                       "country_code": country_code, "issued_at": time.time(), "used": False,
                                       "appid": payload.get("appid") or sim.creds.appid}
    return json_response({"code": code})


@blueprint.post("/sim/subscribe-grants")
def sim_grant():
    state = current_simulator().state
    payload = request_json() or {}
    openid, template_id, count = payload.get("openid"), payload.get("template_id"), payload.get("count", 1)
    if not openid or not template_id or not isinstance(count, int) or count < 1:
        return json_response({"error": "openid_template_id_and_positive_count_required"}, 400)
    with state.lock:
        key = (openid, template_id)
        state.grants[key] = state.grants.get(key, 0) + count
        remaining = state.grants[key]
    return json_response({"openid": openid, "template_id": template_id, "remaining": remaining})


@blueprint.post("/sim/pay")
def sim_pay():
    """The user completes wx.requestPayment for this order."""
    sim = current_simulator()
    payload = request_json() or {}
    out_trade_no = payload.get("out_trade_no")
    with sim.state.lock:
        order = sim.state.orders.get(out_trade_no or "")
        if not order:
            return json_response({"error": "order_not_found"}, 404)
        if order["trade_state"] != "NOTPAY":
            return json_response({"error": "order_not_payable", "trade_state": order["trade_state"]}, 409)
        order["trade_state"] = "SUCCESS"
        order["transaction_id"] = "42" + datetime.now(CHINA_TZ).strftime("%Y%m%d") + secrets.token_hex(9)
        order["success_time"] = rfc3339_now()
        record = sim.new_notification("transaction", "TRANSACTION.SUCCESS", "支付成功", order["notify_url"],
                                      sim.transaction_view(order))
        result = {"out_trade_no": out_trade_no, "transaction_id": order["transaction_id"],
                  "notification_id": record["id"]}
    if payload.get("deliver", True):
        outcome = sim.deliver_first(record["id"])
        result.update(status_code=outcome["status_code"], error=outcome["error"], delivered=outcome["delivered"])
    else:
        result.update(status_code=None, error=None, delivered=False)
    return json_response(result)


@blueprint.post("/sim/redeliver")
def sim_redeliver():
    """Send a stored notification again (same id and body). copies>1 sends them concurrently. These manual
    deliveries queue no automatic retries, but one answered 2xx acknowledges the notification and so ends its
    automatic redelivery."""
    sim = current_simulator()
    payload = request_json() or {}
    notification_id = payload.get("notification_id")
    copies = int(payload.get("copies", 1))
    resign = bool(payload.get("resign", True))
    with sim.state.lock:
        if notification_id not in sim.state.notifications:
            return json_response({"error": "notification_not_found"}, 404)
    if copies < 1 or copies > 500:
        return json_response({"error": "copies_out_of_range"}, 400)
    if copies == 1:
        outcomes = [sim.deliver(notification_id, resign)]
    else:
        outcomes: list = [None] * copies
        barrier = threading.Barrier(copies)

        def send(index):
            barrier.wait()
            outcomes[index] = sim.deliver(notification_id, resign)

        threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(copies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return json_response({"notification_id": notification_id, "status_code": outcomes[0]["status_code"],
                          "deliveries": outcomes})


@blueprint.post("/sim/refunds/settle")
def sim_settle_refunds():
    """Settle PROCESSING refunds now (all, or the one named). On return every such refund is settled and its
    callback delivery attempt is over, including settlements the timer had already started."""
    sim = current_simulator()
    wanted = (request_json() or {}).get("out_refund_no")
    with sim.state.lock:
        pending = [no for no, r in sim.state.refunds.items()
                   if r["status"] == "PROCESSING" and wanted in (None, no)]
        events = [event for no, event in sim.state.refund_settled.items() if wanted in (None, no)]
    outcomes = [outcome for no in pending if (outcome := sim.settle_refund(no)) is not None]
    for event in events:
        event.wait(sim.callback_timeout_s + 1)
    return json_response({"settled": pending, "deliveries": outcomes})


@blueprint.post("/sim/faults")
def sim_fault():
    state = current_simulator().state
    payload = request_json() or {}
    mode = payload.get("mode")
    count = payload.get("count", 1)
    if mode not in FAULT_MODES or not isinstance(count, int) or count < 1:
        return json_response({"error": "bad_fault", "modes": list(FAULT_MODES)}, 400)
    fault = {"path_prefix": payload.get("path_prefix") or "/", "mode": mode, "count": count,
             "delay_s": float(payload.get("delay_s") or 15.0)}
    with state.lock:
        state.faults.append(fault)
    return json_response(fault)


@blueprint.post("/sim/tokens/revoke")
def sim_revoke_tokens():
    state = current_simulator().state
    with state.lock:
        revoked = len(state.tokens)
        state.tokens.clear()
    return json_response({"revoked": revoked})


@blueprint.post("/sim/reset")
def sim_reset():
    """Forget everything, automatic redeliveries still pending included."""
    current_simulator().reset()
    return json_response({"ok": True})


@blueprint.get("/sim/stats")
def sim_stats():
    sim = current_simulator()
    state = sim.state
    with state.lock:
        records = list(state.notifications.values())
        by_status: dict[str, int] = {}
        for record in records:
            status = record["redelivery"]["status"]
            by_status[status] = by_status.get(status, 0) + 1
        return json_response({"token_issued": state.token_issued, "orders": len(state.orders),
                              "refunds": len(state.refunds), "notifications": len(records),
                              "messages": len(state.messages),
                              "deliveries": sum(len(record["deliveries"]) for record in records),
                              "redelivery": {**sim.redelivery_config(), "notifications": by_status}})


@blueprint.get("/sim/deliveries")
def sim_deliveries():
    """Every callback delivery attempt (initial, automatic redelivery, manual), oldest first; ?notification_id=
    keeps one notification's."""
    state = current_simulator().state
    wanted = request.args.get("notification_id")
    with state.lock:
        attempts = [{**attempt, "kind": record["kind"], "event_type": record["event_type"], "url": record["url"]}
                    for record in state.notifications.values() if wanted in (None, record["id"])
                    for attempt in record["deliveries"]]
    attempts.sort(key=lambda attempt: attempt["at"])
    return json_response(attempts)


@blueprint.get("/sim/notifications")
def sim_notifications():
    state = current_simulator().state
    with state.lock:
        return json_response([{key: value for key, value in record.items()
                               if key not in ("headers", "on_acknowledged")}
                              for record in state.notifications.values()])


@blueprint.get("/sim/refunds")
def sim_refunds():
    sim = current_simulator()
    with sim.state.lock:
        return json_response([{**sim.refund_view(r), "reason": r["reason"], "notify_url": r["notify_url"],
                               "notification_ids": list(r["notification_ids"])}
                              for r in sim.state.refunds.values()])


@blueprint.get("/sim/orders")
def sim_orders():
    sim = current_simulator()
    with sim.state.lock:
        return json_response([{**sim.transaction_view(o), "notify_url": o["notify_url"],
                               "prepay_id": o.get("prepay_id")} for o in sim.state.orders.values()])


@blueprint.get("/sim/messages")
def sim_messages():
    state = current_simulator().state
    with state.lock:
        return json_response(list(state.messages))
