"""WeChat's virtual payment (xpay, 虚拟支付) for mini-programs, as we read its documentation.

- The client calls wx.requestVirtualPayment({mode: "short_series_goods", signData, paySig, signature}); WeChat
  checks paySig = hex HMAC-SHA256(AppKey of signData's env, "requestVirtualPayment&" + signData) and signature =
  hex HMAC-SHA256(the user's current session_key, signData). `POST /sim/xpay/pay` plays that call.
- Server APIs (`POST /xpay/query_order`, `POST /xpay/refund_order`) take `access_token` and `pay_sig` = hex
  HMAC-SHA256(AppKey, uri + "&" + body) in the query string, where uri is the path alone (no query string) and
  body the exact bytes posted.
- Pushes go to the mini-program's one message-push URL, signed (and in safe mode encrypted) like every push
  (WeChatSimulator.push_http):
  `xpay_goods_deliver_notify` once paid, `xpay_refund_notify` once a refund ends. Only the JSON answer
  {"ErrCode": 0, ...} acknowledges one; anything else is pushed again on the redelivery schedule.
- Orders paid on iOS cannot be refunded by the developer (Apple decides): refund_order refuses them.

Written from the documentation, independently of the app's gateway, so a misunderstanding on either side fails a
test. The error codes marked (ours) are this simulator's choice where we could not confirm WeChat's number.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from datetime import datetime

from flask import Blueprint, Response, request

from wechat_sim.signing import CHINA_TZ
from wechat_sim.simulator import WeChatSimulator, current_simulator
from wechat_sim.web import json_response, mp_error, request_json

ERR_PARAM = 268490001  # (ours) a missing or malformed field
ERR_ORDER_NOT_EXIST = 268490002  # (ours)
ERR_PAY_SIG = 268490003  # pay_sig does not verify (e.g. signed with the query string in the uri)
ERR_DUPLICATE = 268490004  # the operation was done before (a refund_order_id used already)
ERR_LEFT_FEE = 268490008  # (ours) left_fee is not what remains of the order
ERR_REFUND_NOT_ALLOWED = 268490009  # (ours) iOS orders, or orders in a state that cannot be refunded

# Order status, from query_order's documentation: 0 initialised, 1 created, 2 paid (awaiting delivery),
# 3 delivering, 4 delivered, 5 refunded, 6 closed, 7 refund failed, 8 refunded by the user, 9/10 ad-money/split
# reversals. A refund order (order_type 1) is 1 while in progress, 5 once refunded, 7 when it failed.
PAID, DELIVERED, REFUNDED, REFUND_FAILED, CREATED = 2, 4, 5, 7, 1
REFUNDABLE = (PAID, 3, DELIVERED, REFUND_FAILED)
ENV_TYPE = {0: 1, 1: 2}  # request env (0 production, 1 sandbox) -> env_type in answers (1 production, 2 sandbox)
REFUND_ORDER_ID = re.compile(r"^[A-Za-z0-9_-]{8,32}$")

blueprint = Blueprint("xpay", __name__)


def hmac_hex(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def app_key(sim: WeChatSimulator, env) -> str | None:
    return {0: sim.creds.xpay_app_key, 1: sim.creds.xpay_sandbox_app_key}.get(env)


def _now() -> int:
    return int(time.time())


def _wx_id(prefix: str) -> str:
    return prefix + datetime.now(CHINA_TZ).strftime("%Y%m%d") + secrets.token_hex(8)


def _error(errcode: int, errmsg: str) -> Response:
    return mp_error(errcode, errmsg)


def _authenticated_body(sim: WeChatSimulator):
    """(payload, None) for a server API call carrying a valid access_token and pay_sig, else (None, the error)."""
    ok, errcode = sim.token_valid(request.args.get("access_token"))
    if not ok:
        return None, _error(errcode, "invalid credential, access_token is invalid or not latest")
    body = request.get_data(as_text=True)
    try:
        payload = json.loads(body or "null")
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return None, _error(ERR_PARAM, "body is not a JSON object")
    key = app_key(sim, payload.get("env", 0))
    if key is None:
        return None, _error(ERR_PARAM, "env must be 0 or 1")
    if not hmac.compare_digest(hmac_hex(key, request.path + "&" + body), request.args.get("pay_sig", "")):
        return None, _error(ERR_PAY_SIG, "pay_sig error")
    return payload, None


def order_view(order: dict) -> dict:
    """A payment or refund order as query_order answers it."""
    return {
        "order_id": order["order_id"], "create_time": order["create_time"], "update_time": order["update_time"],
        "status": order["status"], "biz_type": 0, "order_fee": order["order_fee"], "coupon_fee": 0,
        "paid_fee": order["paid_fee"], "order_type": order["order_type"], "refund_fee": order.get("refund_fee", 0),
        "paid_time": order.get("paid_time", 0), "provide_time": order.get("provide_time", 0),
        "biz_meta": order.get("biz_meta", ""), "env_type": ENV_TYPE[order["env"]], "token": "",
        "left_fee": order.get("left_fee", 0), "wx_order_id": order["wx_order_id"],
        "channel_order_id": order.get("channel_order_id", ""), "wxpay_order_id": order.get("wxpay_order_id", ""),
        "sett_time": 0, "sett_state": 0,
    }


def _push_header(sim: WeChatSimulator, openid: str, event: str) -> dict:
    return {"ToUserName": sim.creds.original_id, "FromUserName": openid, "CreateTime": _now(),
            "MsgType": "event", "Event": event}


@blueprint.post("/sim/push-url")
def sim_push_url():
    """Configure the mini-program's message-push URL (WeChat's console has one per mini-program)."""
    sim = current_simulator()
    url = (request_json() or {}).get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        return json_response({"error": "url_required"}, 400)
    sim.push_url = url
    return json_response({"url": url})


@blueprint.post("/sim/xpay/pay")
def sim_xpay_pay():
    """The user completes wx.requestVirtualPayment: {sign_data, pay_sig, signature, openid, platform ("android" |
    "ios" | ...), mode, deliver}. WeChat verifies both signatures, takes the money and pushes
    xpay_goods_deliver_notify."""
    sim = current_simulator()
    payload = request_json() or {}
    sign_data, openid = payload.get("sign_data"), payload.get("openid")
    if not isinstance(sign_data, str) or not isinstance(openid, str):
        return json_response({"error": "sign_data_and_openid_required"}, 400)
    if payload.get("mode") != "short_series_goods":
        return json_response({"error": "mode_not_supported"}, 400)
    try:
        data = json.loads(sign_data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return json_response({"error": "sign_data_not_json"}, 400)
    key = app_key(sim, data.get("env"))
    if key is None or not hmac.compare_digest(hmac_hex(key, "requestVirtualPayment&" + sign_data),
                                              str(payload.get("pay_sig", ""))):
        return json_response({"error": "pay_sig_invalid"}, 400)
    state = sim.state
    with state.lock:
        session_key = state.session_keys.get(openid)
        if session_key is None or not hmac.compare_digest(hmac_hex(session_key, sign_data),
                                                          str(payload.get("signature", ""))):
            return json_response({"error": "signature_invalid"}, 400)
        problems = [name for name, ok in (
            ("offerId", data.get("offerId") == sim.creds.xpay_offer_id),
            ("currencyType", data.get("currencyType") == "CNY"),
            ("buyQuantity", _positive_int(data.get("buyQuantity"))),
            ("goodsPrice", _positive_int(data.get("goodsPrice"))),
            ("productId", isinstance(data.get("productId"), str) and bool(data.get("productId"))),
            ("outTradeNo", isinstance(data.get("outTradeNo"), str) and bool(data.get("outTradeNo"))),
        ) if not ok]
        if problems:
            return json_response({"error": "sign_data_invalid", "fields": problems}, 400)
        out_trade_no = data["outTradeNo"]
        if out_trade_no in state.xpay_orders:
            return json_response({"error": "order_already_paid"}, 409)
        fee = data["goodsPrice"] * data["buyQuantity"]
        at = _now()
        order = {"order_id": out_trade_no, "openid": openid, "env": data["env"],
                 "platform": payload.get("platform", "android"), "product_id": data["productId"],
                 "quantity": data["buyQuantity"], "attach": data.get("attach", ""), "order_type": 0,
                 "order_fee": fee, "paid_fee": fee, "left_fee": fee, "status": PAID, "create_time": at,
                 "update_time": at, "paid_time": at, "wx_order_id": _wx_id("wxo"),
                 "channel_order_id": _wx_id("ch"), "wxpay_order_id": "42" + _wx_id("")}
        state.xpay_orders[out_trade_no] = order
        message = {**_push_header(sim, openid, "xpay_goods_deliver_notify"), "OpenId": openid,
                   "OutTradeNo": out_trade_no, "Env": data["env"],
                   "WeChatPayInfo": {"MchOrderNo": order["channel_order_id"],
                                     "TransactionId": order["wxpay_order_id"], "PaidTime": at},
                   "GoodsInfo": {"ProductId": data["productId"], "Quantity": data["buyQuantity"],
                                 "OrigPrice": fee, "ActualPrice": fee,
                                 "Attach": data.get("attach", "")}}
        record = sim.new_push(message, on_acknowledged=lambda: _delivered(order))
        result = {"out_trade_no": out_trade_no, "wx_order_id": order["wx_order_id"],
                  "notification_id": record["id"]}
    return json_response({**result, **_first_delivery(sim, record["id"], payload.get("deliver", True))})


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _delivered(order: dict) -> None:
    if order["status"] == PAID:
        order.update(status=DELIVERED, provide_time=_now(), update_time=_now())


def _first_delivery(sim: WeChatSimulator, notification_id: str, deliver: bool) -> dict:
    if not deliver:
        return {"status_code": None, "error": None, "delivered": False, "reply": None}
    outcome = sim.deliver_first(notification_id)
    return {key: outcome.get(key) for key in ("status_code", "error", "delivered", "reply")}


def _find(orders, payload: dict) -> dict | None:
    """The order the call names (order_id or wx_order_id) if it is the caller's user's, in the caller's env."""
    wanted_id, wx_order_id = payload.get("order_id"), payload.get("wx_order_id")
    order = next((o for o in orders if (wanted_id and o["order_id"] == wanted_id)
                  or (wx_order_id and o["wx_order_id"] == wx_order_id)), None)
    if order is None or order["openid"] != payload.get("openid") or order["env"] != payload.get("env", 0):
        return None
    return order


@blueprint.post("/xpay/query_order")
def query_order():
    sim = current_simulator()
    payload, refused = _authenticated_body(sim)
    if refused:
        return refused
    state = sim.state
    with state.lock:
        order = _find((*state.xpay_orders.values(), *state.xpay_refunds.values()), payload)
        if order is None:
            return _error(ERR_ORDER_NOT_EXIST, "order not exist")
        return json_response({"errcode": 0, "errmsg": "ok", "order": order_view(order)})


@blueprint.post("/xpay/refund_order")
def refund_order():
    sim = current_simulator()
    payload, refused = _authenticated_body(sim)
    if refused:
        return refused
    state = sim.state
    refund_order_id = payload.get("refund_order_id")
    with state.lock:
        state.xpay_refund_calls += 1
        if not isinstance(refund_order_id, str) or not REFUND_ORDER_ID.match(refund_order_id):
            return _error(ERR_PARAM, "refund_order_id must be 8-32 letters, digits, _ or -")
        if str(payload.get("refund_reason")) not in "012345" or str(payload.get("req_from")) not in ("1", "2", "3"):
            return _error(ERR_PARAM, "refund_reason must be 0-5 and req_from 1-3")
        order = _find(state.xpay_orders.values(), payload)
        if order is None:
            return _error(ERR_ORDER_NOT_EXIST, "order not exist")
        existing = state.xpay_refunds.get(refund_order_id)
        if existing is not None:
            if existing["pay_order_id"] != order["order_id"]:
                return _error(ERR_PARAM, "refund_order_id already used for another order")
            return _error(ERR_DUPLICATE, "duplicate operation")
        if order["platform"] == "ios":
            return _error(ERR_REFUND_NOT_ALLOWED, "orders paid on iOS cannot be refunded by the developer")
        if order["status"] not in REFUNDABLE:
            return _error(ERR_REFUND_NOT_ALLOWED, "order status does not allow a refund")
        refund_fee = payload.get("refund_fee")
        if payload.get("left_fee") != order["left_fee"]:
            return _error(ERR_LEFT_FEE, "left_fee does not match what is left of the order")
        if not _positive_int(refund_fee) or refund_fee > order["left_fee"]:
            return _error(ERR_PARAM, "refund_fee must be in (0, left_fee]")
        at = _now()
        order["left_fee"] -= refund_fee
        refund = {"order_id": refund_order_id, "pay_order_id": order["order_id"], "openid": order["openid"],
                  "env": order["env"], "order_type": 1, "order_fee": order["order_fee"], "paid_fee": 0,
                  "refund_fee": refund_fee, "status": CREATED, "create_time": at, "update_time": at,
                  "wx_order_id": _wx_id("wxr"), "biz_meta": payload.get("biz_meta", ""),
                  "refund_reason": str(payload.get("refund_reason")), "req_from": str(payload.get("req_from")),
                  "notification_ids": []}
        state.xpay_refunds[refund_order_id] = refund
        answer = {"errcode": 0, "errmsg": "ok", "refund_order_id": refund_order_id,
                  "refund_wx_order_id": refund["wx_order_id"], "pay_order_id": order["order_id"],
                  "pay_wx_order_id": order["wx_order_id"]}
    if sim.refund_settle_delay_s is not None:
        timer = threading.Timer(sim.refund_settle_delay_s, settle_refund, args=(sim, refund_order_id))
        timer.daemon = True
        timer.start()
    return json_response(answer)


def settle_refund(sim: WeChatSimulator, refund_order_id: str) -> dict | None:
    """End an xpay refund in progress (refunded, or failed when an `xpay_refund_failed` fault is armed) and push
    xpay_refund_notify; the first delivery's outcome, or None when there was nothing to settle."""
    state = sim.state
    with state.lock:
        refund = state.xpay_refunds.get(refund_order_id)
        if refund is None or refund["status"] != CREATED:
            return None
        order = state.xpay_orders[refund["pay_order_id"]]
        failed = sim.take_fault("/xpay/refund_order", ("xpay_refund_failed",)) is not None
        at = _now()
        if failed:
            refund.update(status=REFUND_FAILED, update_time=at)
            order["left_fee"] += refund["refund_fee"]
        else:
            refund.update(status=REFUNDED, update_time=at, paid_time=at)
            if order["left_fee"] == 0:
                order.update(status=REFUNDED, update_time=at)
        message = {**_push_header(sim, order["openid"], "xpay_refund_notify"), "OpenId": order["openid"],
                   "WxRefundId": refund["wx_order_id"], "MchRefundId": refund_order_id,
                   "WxOrderId": order["wx_order_id"], "MchOrderId": order["order_id"],
                   "RefundFee": refund["refund_fee"], "RetCode": 1 if failed else 0,
                   "RetMsg": "退款失败" if failed else "退款成功", "RefundStartTimestamp": refund["create_time"],
                   "RefundSuccTimestamp": 0 if failed else at,
                   "WxpayRefundTransactionId": "" if failed else "50" + _wx_id(""), "RetryTimes": 0}
        record = sim.new_push(message)
        refund["notification_ids"].append(record["id"])
    return sim.deliver_first(record["id"])


@blueprint.post("/sim/xpay/refunds/settle")
def sim_settle_refunds():
    """Settle xpay refunds in progress now (all, or {"refund_order_id": ...}) and push their results."""
    sim = current_simulator()
    wanted = (request_json() or {}).get("refund_order_id")
    with sim.state.lock:
        pending = [no for no, r in sim.state.xpay_refunds.items() if r["status"] == CREATED and wanted in (None, no)]
    outcomes = [outcome for no in pending if (outcome := settle_refund(sim, no)) is not None]
    return json_response({"settled": pending, "deliveries": outcomes})


@blueprint.get("/sim/xpay/orders")
def sim_orders():
    state = current_simulator().state
    with state.lock:
        return json_response([{**order_view(o), "openid": o["openid"], "platform": o["platform"],
                               "product_id": o["product_id"]} for o in state.xpay_orders.values()])


@blueprint.get("/sim/xpay/refunds")
def sim_refunds():
    """Every refund WeChat accepted, and how many refund_order calls it received in all (refused ones too)."""
    state = current_simulator().state
    with state.lock:
        return json_response({"calls": state.xpay_refund_calls,
                              "refunds": [{**order_view(r), "pay_order_id": r["pay_order_id"],
                                           "notification_ids": list(r["notification_ids"])}
                                          for r in state.xpay_refunds.values()]})
