"""WeChat Pay v3: JSAPI prepay, order query and close, refunds and their queries, and the merchant request
authentication every /v3/ request goes through."""
from __future__ import annotations

import re
import secrets
import threading
import time
from datetime import datetime

from flask import Blueprint, Response, request

from wechat_sim.signing import CHINA_TZ, SIGNATURE_TYPE, request_message, rfc3339_now, verify
from wechat_sim.simulator import WeChatSimulator, current_simulator
from wechat_sim.web import json_response, request_json, v3_error

PREPAY_TTL_S = 7200
MERCHANT_CLOCK_SKEW_S = 300

_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')

blueprint = Blueprint("pay", __name__)


def authenticate_merchant(sim: WeChatSimulator) -> Response | None:
    """The error WeChat Pay answers the current request with when its Authorization is not the merchant's valid
    signature, or None when it is."""
    creds = sim.creds
    header = request.headers.get("Authorization", "")
    scheme, _, params = header.partition(" ")
    fields = dict(_AUTH_FIELD.findall(params))
    if scheme != SIGNATURE_TYPE or not {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} <= set(fields):
        return v3_error(401, "SIGN_ERROR", "Authorization header missing or malformed")
    if fields["mchid"] != creds.mchid:
        return v3_error(401, "SIGN_ERROR", "mchid does not match")
    if fields["serial_no"] != creds.merchant_cert_serial_no:
        return v3_error(401, "SIGN_ERROR", "merchant certificate serial_no unknown")
    try:
        skew = abs(time.time() - int(fields["timestamp"]))
    except ValueError:
        skew = float("inf")
    if skew > MERCHANT_CLOCK_SKEW_S:
        return v3_error(401, "SIGN_ERROR", "timestamp out of window")
    url = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not url:
        query = request.query_string.decode("latin-1")
        url = request.path + (f"?{query}" if query else "")
    message = request_message(request.method, url, fields["timestamp"], fields["nonce_str"],
                              request.get_data(as_text=True))
    if not verify(sim.merchant_public_key, message, fields["signature"]):
        return v3_error(401, "SIGN_ERROR", "signature verification failed")
    serial_header = request.headers.get("Wechatpay-Serial")
    if serial_header and serial_header != creds.platform_public_key_id:
        return v3_error(400, "PARAM_ERROR", "Wechatpay-Serial is not a known platform public key id")
    return None


def _positive_fen(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@blueprint.post("/v3/pay/transactions/jsapi")
def jsapi_prepay():
    sim = current_simulator()
    creds, state = sim.creds, sim.state
    payload = request_json()
    if payload is None:
        return v3_error(400, "PARAM_ERROR", "body is not a JSON object")
    for key in ("appid", "mchid", "description", "out_trade_no", "notify_url", "amount", "payer"):
        if not payload.get(key):
            return v3_error(400, "PARAM_ERROR", f"missing {key}")
    if payload["appid"] != creds.appid or payload["mchid"] != creds.mchid:
        return v3_error(400, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match")
    total = payload["amount"].get("total")
    if not _positive_fen(total):
        return v3_error(400, "PARAM_ERROR", "amount.total must be a positive integer (fen)")
    openid = payload["payer"].get("openid")
    out_trade_no = payload["out_trade_no"]
    with state.lock:
        if openid not in state.openid_by_user.values():
            return v3_error(400, "PARAM_ERROR", "openid does not belong to this appid")
        order = state.orders.get(out_trade_no)
        if order:
            if order["trade_state"] in ("SUCCESS", "REFUND"):
                return v3_error(400, "ORDERPAID", "该订单已支付")
            if order["trade_state"] == "CLOSED":
                return v3_error(400, "ORDER_CLOSED", "订单已关闭")
            same = (order["amount"]["total"] == total and order["payer"]["openid"] == openid
                    and order["description"] == payload["description"])
            if not same:
                return v3_error(400, "INVALID_REQUEST", "201 商户订单号重复")
            if order["prepay_expires_at"] > time.time():
                return json_response({"prepay_id": order["prepay_id"]})
        else:
            order = {"appid": creds.appid, "mchid": creds.mchid, "out_trade_no": out_trade_no,
                     "description": payload["description"], "attach": payload.get("attach", ""),
                     "notify_url": payload["notify_url"], "trade_state": "NOTPAY",
                     "amount": {"total": total, "currency": payload["amount"].get("currency", "CNY")},
                     "payer": {"openid": openid}, "created_at": time.time()}
            state.orders[out_trade_no] = order
        order["prepay_id"] = "wx" + datetime.now(CHINA_TZ).strftime("%d%H%M%S") + secrets.token_hex(12)
        order["prepay_expires_at"] = time.time() + PREPAY_TTL_S
        return json_response({"prepay_id": order["prepay_id"]})


@blueprint.get("/v3/pay/transactions/out-trade-no/<out_trade_no>")
def query_transaction(out_trade_no):
    sim = current_simulator()
    if request.args.get("mchid") != sim.creds.mchid:
        return v3_error(400, "PARAM_ERROR", "mchid missing or wrong")
    with sim.state.lock:
        order = sim.state.orders.get(out_trade_no)
        if not order:
            return v3_error(404, "ORDER_NOT_EXIST", "订单不存在")
        return json_response(sim.transaction_view(order))


@blueprint.post("/v3/pay/transactions/out-trade-no/<out_trade_no>/close")
def close_transaction(out_trade_no):
    sim = current_simulator()
    payload = request_json() or {}
    if payload.get("mchid") != sim.creds.mchid:
        return v3_error(400, "PARAM_ERROR", "mchid missing or wrong")
    with sim.state.lock:
        order = sim.state.orders.get(out_trade_no)
        if not order:
            return v3_error(404, "ORDER_NOT_EXIST", "订单不存在")
        if order["trade_state"] in ("SUCCESS", "REFUND"):
            return v3_error(400, "ORDERPAID", "该订单已支付")
        order["trade_state"] = "CLOSED"
    return Response(status=204)


@blueprint.post("/v3/refund/domestic/refunds")
def create_refund():
    sim = current_simulator()
    state = sim.state
    payload = request_json()
    if payload is None:
        return v3_error(400, "PARAM_ERROR", "body is not a JSON object")
    out_refund_no, out_trade_no = payload.get("out_refund_no"), payload.get("out_trade_no")
    amount = payload.get("amount") or {}
    if not out_refund_no or not (out_trade_no or payload.get("transaction_id")):
        return v3_error(400, "PARAM_ERROR", "out_refund_no and out_trade_no are required")
    with state.lock:
        if not out_trade_no:
            out_trade_no = next((o["out_trade_no"] for o in state.orders.values()
                                 if o.get("transaction_id") == payload["transaction_id"]), None)
        existing = state.refunds.get(out_refund_no)
        if existing:
            if existing["out_trade_no"] != out_trade_no:
                return v3_error(400, "INVALID_REQUEST", "out_refund_no already used for another order")
            return json_response(sim.refund_view(existing))
        order = state.orders.get(out_trade_no or "")
        if not order:
            return v3_error(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        if order["trade_state"] not in ("SUCCESS", "REFUND"):
            return v3_error(400, "INVALID_REQUEST", "订单未支付，不能退款")
        refund_fen, total_fen = amount.get("refund"), amount.get("total")
        if total_fen != order["amount"]["total"]:
            return v3_error(400, "INVALID_REQUEST", "amount.total does not match the order total")
        if not _positive_fen(refund_fen):
            return v3_error(400, "PARAM_ERROR", "amount.refund must be a positive integer (fen)")
        committed = sum(r["amount"]["refund"] for r in state.refunds.values()
                        if r["out_trade_no"] == out_trade_no and r["status"] in ("PROCESSING", "SUCCESS"))
        if committed + refund_fen > total_fen:
            return v3_error(400, "INVALID_REQUEST", "申请退款金额超过订单可退金额")
        refund = {
            "refund_id": "50" + secrets.token_hex(14), "out_refund_no": out_refund_no,
            "transaction_id": order["transaction_id"], "out_trade_no": out_trade_no,
            "channel": "ORIGINAL", "user_received_account": "支付用户零钱", "create_time": rfc3339_now(),
            "status": "PROCESSING", "funds_account": "AVAILABLE", "reason": payload.get("reason"),
            "notify_url": payload.get("notify_url"), "notification_ids": [],
            "amount": {"total": total_fen, "refund": refund_fen, "payer_total": total_fen,
                       "payer_refund": refund_fen, "settlement_total": total_fen,
                       "settlement_refund": refund_fen, "discount_refund": 0, "currency": "CNY",
                       "refund_fee": 0, "from": []},
        }
        state.refunds[out_refund_no] = refund
        state.refund_settled[out_refund_no] = threading.Event()
        view = sim.refund_view(refund)
    sim.schedule_settlement(out_refund_no)
    return json_response(view)


@blueprint.get("/v3/refund/domestic/refunds/<out_refund_no>")
def query_refund(out_refund_no):
    sim = current_simulator()
    with sim.state.lock:
        refund = sim.state.refunds.get(out_refund_no)
        if not refund:
            return v3_error(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        return json_response(sim.refund_view(refund))
