"""A Flask app that plays WeChat's servers: mini-program login, access token, subscribe messages, mini-program
codes, and WeChat Pay v3 (JSAPI prepay, query, close, refunds, signed and encrypted callbacks).

The crypto here is written against `cryptography` directly rather than through the SDKs the app uses, so a
misunderstanding in the app side or in an SDK shows up as a failure instead of agreeing with itself.
Control endpoints under /sim/ let tests and developers act as the user ("pay"), read what was sent and inject faults.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import qrcode
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import Flask, Response, request

from wechat_sim.keys import SimCredentials

LOGIN_CODE_TTL_S = 300
ACCESS_TOKEN_TTL_S = 7200
# A replaced token keeps working this long, as WeChat documents for token refreshes.
REPLACED_TOKEN_GRACE_S = 300
PREPAY_TTL_S = 7200
MERCHANT_CLOCK_SKEW_S = 300
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
FAULT_MODES = ("5xx", "timeout", "not_enough", "refund_abnormal", "refund_closed")
CHINA_TZ = timezone(timedelta(hours=8))

_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')


def _rfc3339_now() -> str:
    return datetime.now(CHINA_TZ).isoformat(timespec="seconds")


def _sign(private_key, message: str) -> str:
    signature = private_key.sign(message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def _verify(public_key, message: str, signature_b64: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), message.encode("utf-8"),
                          padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def _json_response(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status,
                    content_type="application/json; charset=utf-8")


def _mp_error(errcode: int, errmsg: str) -> Response:
    # Mini-program APIs report errors in the body with HTTP 200.
    return _json_response({"errcode": errcode, "errmsg": f"{errmsg} rid: {secrets.token_hex(6)}"})


def _v3_error(status: int, code: str, message: str) -> Response:
    return _json_response({"code": code, "message": message}, status)


class _SimState:
    def __init__(self):
        self.lock = threading.RLock()
        self.reset()

    def reset(self):
        self.openid_by_user: dict[str, str] = {}
        self.login_codes: dict[str, dict] = {}
        self.tokens: dict[str, float] = {}
        self.token_issued = 0
        self.grants: dict[tuple[str, str], int] = {}
        self.messages: list[dict] = []
        self.orders: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.notifications: dict[str, dict] = {}
        self.faults: list[dict] = []
        # Set once a refund's outcome is decided and its callback delivery attempt is over.
        self.refund_settled: dict[str, threading.Event] = {}


def create_sim_app(creds: SimCredentials, *, refund_settle_delay_s: float | None = None,
                   callback_timeout_s: float = 5.0) -> Flask:
    """Refunds stay PROCESSING until POST /sim/refunds/settle, which keeps tests deterministic; with
    refund_settle_delay_s they also settle by themselves that long after being requested, as WeChat does."""
    app = Flask("wechat_sim")
    state = _SimState()
    merchant_public_key = serialization.load_pem_public_key(creds.merchant_public_key_pem.encode("ascii"))
    platform_private_key = serialization.load_pem_private_key(creds.platform_private_key_pem.encode("ascii"),
                                                              password=None)
    app.extensions["wechat_sim_state"] = state

    # ---------------------------------------------------------------- helpers

    def openid_for(user_name: str) -> str:
        digest = hmac.new(creds.app_secret.encode(), f"{creds.appid}:{user_name}".encode(), hashlib.sha256).digest()
        return "o" + base64.urlsafe_b64encode(digest).decode("ascii")[:27]

    def token_valid(token: str | None) -> tuple[bool, int]:
        with state.lock:
            expires_at = state.tokens.get(token or "")
        if expires_at is None:
            return False, 40001
        if expires_at < time.time():
            return False, 42001
        return True, 0

    def body_json() -> dict | None:
        try:
            data = json.loads(request.get_data(as_text=True) or "null")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def take_fault(path: str, modes: tuple[str, ...]) -> dict | None:
        with state.lock:
            for fault in state.faults:
                if fault["count"] > 0 and fault["mode"] in modes and path.startswith(fault["path_prefix"]):
                    fault["count"] -= 1
                    return dict(fault)
        return None

    def encrypt_resource(plain: dict, associated_data: str) -> dict:
        nonce = secrets.token_hex(6)  # 12 ASCII characters, used as the 12-byte GCM nonce like WeChat does
        ciphertext = AESGCM(creds.apiv3_key.encode("ascii")).encrypt(
            nonce.encode("ascii"), json.dumps(plain, ensure_ascii=False).encode("utf-8"),
            associated_data.encode("utf-8"))
        return {"algorithm": "AEAD_AES_256_GCM", "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
                "associated_data": associated_data, "nonce": nonce, "original_type": associated_data}

    def signed_headers(body: str) -> dict:
        timestamp = str(int(time.time()))
        nonce = secrets.token_hex(16).upper()
        return {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": _sign(platform_private_key, f"{timestamp}\n{nonce}\n{body}\n"),
            "Wechatpay-Serial": creds.platform_public_key_id,
            "Wechatpay-Signature-Type": SIGNATURE_TYPE,
        }

    def new_notification(kind: str, event_type: str, summary: str, url: str | None, plain: dict) -> dict:
        """Caller holds the lock."""
        notification_id = str(uuid.uuid4())
        body = json.dumps({
            "id": notification_id,
            "create_time": _rfc3339_now(),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": encrypt_resource(plain, kind),
        }, ensure_ascii=False)
        record = {"id": notification_id, "kind": kind, "event_type": event_type, "url": url, "body": body,
                  "resource": plain, "created_at": time.time(), "headers": None, "deliveries": []}
        state.notifications[notification_id] = record
        return record

    def deliver(notification_id: str, resign: bool = True) -> dict:
        """POST one notification to its notify_url, as WeChat does on every (re)delivery. Never holds the lock
        while waiting on the receiver, which may well call back into the simulator."""
        with state.lock:
            record = state.notifications[notification_id]
            body, url = record["body"], record["url"]
            headers = record["headers"] if (record["headers"] and not resign) else signed_headers(body)
            record["headers"] = headers
        outcome = {"notification_id": notification_id, "status_code": None, "error": None, "at": time.time()}
        if not url:
            outcome["error"] = "no_notify_url"
        else:
            try:
                response = requests.post(url, data=body.encode("utf-8"), timeout=callback_timeout_s, headers={
                    **headers, "Content-Type": "application/json", "User-Agent": "Mozilla/4.0"})
                outcome["status_code"] = response.status_code
            except requests.Timeout:
                outcome["error"] = "timeout"
            except requests.RequestException as error:
                outcome["error"] = f"connection_error: {type(error).__name__}"
        outcome["delivered"] = outcome["status_code"] in (200, 204)
        with state.lock:
            record["deliveries"].append(outcome)
        return outcome

    def transaction_view(order: dict) -> dict:
        view = {
            "appid": order["appid"], "mchid": order["mchid"], "out_trade_no": order["out_trade_no"],
            "trade_type": "JSAPI", "trade_state": order["trade_state"],
            "trade_state_desc": {"NOTPAY": "订单未支付", "SUCCESS": "支付成功", "CLOSED": "订单已关闭",
                                 "REFUND": "转入退款"}[order["trade_state"]],
            "attach": order.get("attach", ""),
            "amount": {"total": order["amount"]["total"], "currency": order["amount"].get("currency", "CNY")},
            "promotion_detail": [],
        }
        if order.get("transaction_id"):
            view.update({
                "transaction_id": order["transaction_id"], "bank_type": "OTHERS",
                "success_time": order["success_time"], "payer": {"openid": order["payer"]["openid"]},
            })
            view["amount"].update({"payer_total": order["amount"]["total"], "payer_currency": "CNY"})
        return view

    def refund_view(refund: dict) -> dict:
        view = {key: refund[key] for key in ("refund_id", "out_refund_no", "transaction_id", "out_trade_no",
                                             "channel", "user_received_account", "create_time", "status",
                                             "funds_account")}
        view["amount"] = dict(refund["amount"])
        view["promotion_detail"] = []
        if refund.get("success_time"):
            view["success_time"] = refund["success_time"]
        return view

    def settle_refund(out_refund_no: str) -> dict | None:
        with state.lock:
            refund = state.refunds.get(out_refund_no)
            if refund is None or refund["status"] != "PROCESSING":
                return None  # settled already (or being settled), or the simulator was reset meanwhile
            done = state.refund_settled[out_refund_no]
            outcome_fault = take_fault("/v3/refund/domestic/refunds", ("refund_abnormal", "refund_closed"))
            if outcome_fault is None:
                refund["status"] = "SUCCESS"
                refund["success_time"] = _rfc3339_now()
                state.orders[refund["out_trade_no"]]["trade_state"] = "REFUND"
            else:
                refund["status"] = "ABNORMAL" if outcome_fault["mode"] == "refund_abnormal" else "CLOSED"
            summary = {"SUCCESS": "退款成功", "ABNORMAL": "退款异常", "CLOSED": "退款关闭"}[refund["status"]]
            plain = {
                "mchid": creds.mchid, "out_trade_no": refund["out_trade_no"],
                "transaction_id": refund["transaction_id"], "out_refund_no": refund["out_refund_no"],
                "refund_id": refund["refund_id"], "refund_status": refund["status"],
                "user_received_account": refund["user_received_account"],
                "amount": {key: refund["amount"][key] for key in ("total", "refund", "payer_total", "payer_refund")},
            }
            if refund.get("success_time"):
                plain["success_time"] = refund["success_time"]
            record = new_notification("refund", f"REFUND.{refund['status']}", summary, refund["notify_url"], plain)
            refund["notification_ids"].append(record["id"])
        try:
            return deliver(record["id"])
        finally:
            done.set()

    def schedule_settlement(out_refund_no: str):
        if refund_settle_delay_s is None:
            return
        timer = threading.Timer(refund_settle_delay_s, settle_refund, args=(out_refund_no,))
        timer.daemon = True
        timer.start()

    # ---------------------------------------------------------------- request hooks

    @app.before_request
    def inject_faults_and_authenticate():
        path = request.path
        if path.startswith("/sim/"):
            return None
        fault = take_fault(path, ("5xx", "timeout", "not_enough"))
        if fault and fault["mode"] == "5xx":
            if path.startswith("/v3/"):
                return _v3_error(500, "SYSTEM_ERROR", "系统错误 (simulated)")
            return _json_response({"errcode": -1, "errmsg": "system error (simulated)"}, 500)
        if fault and fault["mode"] == "timeout":
            # The request is still carried out after the delay: the caller cannot know whether it happened.
            time.sleep(fault["delay_s"])
        if path.startswith("/v3/"):
            refused = authenticate_merchant()
            if refused is None and fault and fault["mode"] == "not_enough":
                # What WeChat Pay answers when the merchant's balance cannot cover a refund; nothing is created.
                return _v3_error(403, "NOT_ENOUGH", "基本账户余额不足，请充值后重新发起")
            return refused
        return None

    def authenticate_merchant():
        header = request.headers.get("Authorization", "")
        scheme, _, params = header.partition(" ")
        fields = dict(_AUTH_FIELD.findall(params))
        if scheme != SIGNATURE_TYPE or not {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} <= set(fields):
            return _v3_error(401, "SIGN_ERROR", "Authorization header missing or malformed")
        if fields["mchid"] != creds.mchid:
            return _v3_error(401, "SIGN_ERROR", "mchid does not match")
        if fields["serial_no"] != creds.merchant_cert_serial_no:
            return _v3_error(401, "SIGN_ERROR", "merchant certificate serial_no unknown")
        try:
            skew = abs(time.time() - int(fields["timestamp"]))
        except ValueError:
            skew = float("inf")
        if skew > MERCHANT_CLOCK_SKEW_S:
            return _v3_error(401, "SIGN_ERROR", "timestamp out of window")
        url = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
        if not url:
            query = request.query_string.decode("latin-1")
            url = request.path + (f"?{query}" if query else "")
        message = (f"{request.method}\n{url}\n{fields['timestamp']}\n{fields['nonce_str']}\n"
                   f"{request.get_data(as_text=True)}\n")
        if not _verify(merchant_public_key, message, fields["signature"]):
            return _v3_error(401, "SIGN_ERROR", "signature verification failed")
        serial_header = request.headers.get("Wechatpay-Serial")
        if serial_header and serial_header != creds.platform_public_key_id:
            return _v3_error(400, "PARAM_ERROR", "Wechatpay-Serial is not a known platform public key id")
        return None

    @app.after_request
    def sign_pay_responses(response: Response):
        if request.path.startswith("/v3/"):
            body = response.get_data(as_text=True)
            response.headers.update(signed_headers(body))
            response.headers["Request-ID"] = secrets.token_hex(16)
        return response

    # ---------------------------------------------------------------- mini-program APIs

    @app.get("/sns/jscode2session")
    def jscode2session():
        args = request.args
        if args.get("appid") != creds.appid or args.get("secret") != creds.app_secret:
            return _mp_error(40125, "invalid appsecret")
        if args.get("grant_type") != "authorization_code":
            return _mp_error(40002, "invalid grant_type")
        code = args.get("js_code", "")
        with state.lock:
            entry = state.login_codes.get(code)
            if not entry or entry["used"] or time.time() - entry["issued_at"] > LOGIN_CODE_TTL_S:
                return _mp_error(40029, "invalid code")
            entry["used"] = True
            openid = entry["openid"]
        return _json_response({"openid": openid, "session_key": base64.b64encode(secrets.token_bytes(16)).decode()})

    @app.get("/cgi-bin/token")
    def access_token():
        args = request.args
        if args.get("grant_type") != "client_credential":
            return _mp_error(40002, "invalid grant_type")
        if args.get("appid") != creds.appid:
            return _mp_error(40013, "invalid appid")
        if args.get("secret") != creds.app_secret:
            return _mp_error(40125, "invalid appsecret")
        token = secrets.token_urlsafe(96)
        now = time.time()
        with state.lock:
            for old in state.tokens:
                state.tokens[old] = min(state.tokens[old], now + REPLACED_TOKEN_GRACE_S)
            state.tokens[token] = now + ACCESS_TOKEN_TTL_S
            state.token_issued += 1
        return _json_response({"access_token": token, "expires_in": ACCESS_TOKEN_TTL_S})

    @app.post("/cgi-bin/message/subscribe/send")
    def subscribe_send():
        ok, errcode = token_valid(request.args.get("access_token"))
        if not ok:
            return _mp_error(errcode, "invalid credential, access_token is invalid or not latest")
        payload = body_json()
        if payload is None:
            return _mp_error(47001, "data format error")
        touser, template_id = payload.get("touser"), payload.get("template_id")
        data = payload.get("data")
        with state.lock:
            if touser not in state.openid_by_user.values():
                return _mp_error(40003, "invalid openid")
            if not template_id:
                return _mp_error(40037, "invalid template_id")
            if not isinstance(data, dict) or not all(
                    isinstance(value, dict) and isinstance(value.get("value"), str) for value in data.values()):
                return _mp_error(47003, "argument invalid! data.value invalid")
            remaining = state.grants.get((touser, template_id), 0)
            if remaining <= 0:
                return _mp_error(43101, "user refuse to accept the msg")
            state.grants[(touser, template_id)] = remaining - 1
            state.messages.append({"touser": touser, "template_id": template_id, "page": payload.get("page"),
                                   "data": data, "sent_at": time.time()})
        return _json_response({"errcode": 0, "errmsg": "ok", "msgid": secrets.randbelow(10**12)})

    @app.post("/wxa/getwxacodeunlimit")
    def wxa_code_unlimited():
        ok, errcode = token_valid(request.args.get("access_token"))
        if not ok:
            return _mp_error(errcode, "invalid credential, access_token is invalid or not latest")
        payload = body_json()
        if payload is None or not isinstance(payload.get("scene"), str) or not payload["scene"]:
            return _mp_error(47001, "data format error")
        scene, page = payload["scene"], payload.get("page") or ""
        if len(scene) > 32:
            return _mp_error(40169, "invalid length for scene")
        if page.startswith("/"):
            return _mp_error(41030, "invalid page")
        width = max(280, min(int(payload.get("width") or 430), 1280))
        image = qrcode.make(f"{page}?scene={scene}", border=4).get_image().convert("RGB")
        image = image.resize((width, width), resample=0)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), content_type="image/png")

    # ---------------------------------------------------------------- WeChat Pay v3

    @app.post("/v3/pay/transactions/jsapi")
    def jsapi_prepay():
        payload = body_json()
        if payload is None:
            return _v3_error(400, "PARAM_ERROR", "body is not a JSON object")
        for key in ("appid", "mchid", "description", "out_trade_no", "notify_url", "amount", "payer"):
            if not payload.get(key):
                return _v3_error(400, "PARAM_ERROR", f"missing {key}")
        if payload["appid"] != creds.appid or payload["mchid"] != creds.mchid:
            return _v3_error(400, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match")
        total = payload["amount"].get("total")
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            return _v3_error(400, "PARAM_ERROR", "amount.total must be a positive integer (fen)")
        openid = payload["payer"].get("openid")
        out_trade_no = payload["out_trade_no"]
        with state.lock:
            if openid not in state.openid_by_user.values():
                return _v3_error(400, "PARAM_ERROR", "openid does not belong to this appid")
            order = state.orders.get(out_trade_no)
            if order:
                if order["trade_state"] in ("SUCCESS", "REFUND"):
                    return _v3_error(400, "ORDERPAID", "该订单已支付")
                if order["trade_state"] == "CLOSED":
                    return _v3_error(400, "ORDER_CLOSED", "订单已关闭")
                same = (order["amount"]["total"] == total and order["payer"]["openid"] == openid
                        and order["description"] == payload["description"])
                if not same:
                    return _v3_error(400, "INVALID_REQUEST", "201 商户订单号重复")
                if order["prepay_expires_at"] > time.time():
                    return _json_response({"prepay_id": order["prepay_id"]})
            else:
                order = {"appid": creds.appid, "mchid": creds.mchid, "out_trade_no": out_trade_no,
                         "description": payload["description"], "attach": payload.get("attach", ""),
                         "notify_url": payload["notify_url"], "trade_state": "NOTPAY",
                         "amount": {"total": total, "currency": payload["amount"].get("currency", "CNY")},
                         "payer": {"openid": openid}, "created_at": time.time()}
                state.orders[out_trade_no] = order
            order["prepay_id"] = "wx" + datetime.now(CHINA_TZ).strftime("%d%H%M%S") + secrets.token_hex(12)
            order["prepay_expires_at"] = time.time() + PREPAY_TTL_S
            return _json_response({"prepay_id": order["prepay_id"]})

    @app.get("/v3/pay/transactions/out-trade-no/<out_trade_no>")
    def query_transaction(out_trade_no):
        if request.args.get("mchid") != creds.mchid:
            return _v3_error(400, "PARAM_ERROR", "mchid missing or wrong")
        with state.lock:
            order = state.orders.get(out_trade_no)
            if not order:
                return _v3_error(404, "ORDER_NOT_EXIST", "订单不存在")
            return _json_response(transaction_view(order))

    @app.post("/v3/pay/transactions/out-trade-no/<out_trade_no>/close")
    def close_transaction(out_trade_no):
        payload = body_json() or {}
        if payload.get("mchid") != creds.mchid:
            return _v3_error(400, "PARAM_ERROR", "mchid missing or wrong")
        with state.lock:
            order = state.orders.get(out_trade_no)
            if not order:
                return _v3_error(404, "ORDER_NOT_EXIST", "订单不存在")
            if order["trade_state"] in ("SUCCESS", "REFUND"):
                return _v3_error(400, "ORDERPAID", "该订单已支付")
            order["trade_state"] = "CLOSED"
        return Response(status=204)

    @app.post("/v3/refund/domestic/refunds")
    def create_refund():
        payload = body_json()
        if payload is None:
            return _v3_error(400, "PARAM_ERROR", "body is not a JSON object")
        out_refund_no, out_trade_no = payload.get("out_refund_no"), payload.get("out_trade_no")
        amount = payload.get("amount") or {}
        if not out_refund_no or not (out_trade_no or payload.get("transaction_id")):
            return _v3_error(400, "PARAM_ERROR", "out_refund_no and out_trade_no are required")
        with state.lock:
            if not out_trade_no:
                out_trade_no = next((o["out_trade_no"] for o in state.orders.values()
                                     if o.get("transaction_id") == payload["transaction_id"]), None)
            existing = state.refunds.get(out_refund_no)
            if existing:
                if existing["out_trade_no"] != out_trade_no:
                    return _v3_error(400, "INVALID_REQUEST", "out_refund_no already used for another order")
                return _json_response(refund_view(existing))
            order = state.orders.get(out_trade_no or "")
            if not order:
                return _v3_error(404, "RESOURCE_NOT_EXISTS", "订单不存在")
            if order["trade_state"] not in ("SUCCESS", "REFUND"):
                return _v3_error(400, "INVALID_REQUEST", "订单未支付，不能退款")
            refund_fen, total_fen = amount.get("refund"), amount.get("total")
            if total_fen != order["amount"]["total"]:
                return _v3_error(400, "INVALID_REQUEST", "amount.total does not match the order total")
            if not isinstance(refund_fen, int) or isinstance(refund_fen, bool) or refund_fen <= 0:
                return _v3_error(400, "PARAM_ERROR", "amount.refund must be a positive integer (fen)")
            committed = sum(r["amount"]["refund"] for r in state.refunds.values()
                            if r["out_trade_no"] == out_trade_no and r["status"] in ("PROCESSING", "SUCCESS"))
            if committed + refund_fen > total_fen:
                return _v3_error(400, "INVALID_REQUEST", "申请退款金额超过订单可退金额")
            refund = {
                "refund_id": "50" + secrets.token_hex(14), "out_refund_no": out_refund_no,
                "transaction_id": order["transaction_id"], "out_trade_no": out_trade_no,
                "channel": "ORIGINAL", "user_received_account": "支付用户零钱", "create_time": _rfc3339_now(),
                "status": "PROCESSING", "funds_account": "AVAILABLE", "reason": payload.get("reason"),
                "notify_url": payload.get("notify_url"), "notification_ids": [],
                "amount": {"total": total_fen, "refund": refund_fen, "payer_total": total_fen,
                           "payer_refund": refund_fen, "settlement_total": total_fen,
                           "settlement_refund": refund_fen, "discount_refund": 0, "currency": "CNY",
                           "refund_fee": 0, "from": []},
            }
            state.refunds[out_refund_no] = refund
            state.refund_settled[out_refund_no] = threading.Event()
            view = refund_view(refund)
        schedule_settlement(out_refund_no)
        return _json_response(view)

    @app.get("/v3/refund/domestic/refunds/<out_refund_no>")
    def query_refund(out_refund_no):
        with state.lock:
            refund = state.refunds.get(out_refund_no)
            if not refund:
                return _v3_error(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
            return _json_response(refund_view(refund))

    # ---------------------------------------------------------------- control endpoints

    @app.post("/sim/login")
    def sim_login():
        user = (body_json() or {}).get("user")
        if not isinstance(user, str) or not user:
            return _json_response({"error": "user_required"}, 400)
        code = secrets.token_urlsafe(24)
        openid = openid_for(user)
        with state.lock:
            state.openid_by_user[user] = openid
            state.login_codes[code] = {"openid": openid, "issued_at": time.time(), "used": False}
        return _json_response({"code": code, "openid": openid})

    @app.post("/sim/subscribe-grants")
    def sim_grant():
        payload = body_json() or {}
        openid, template_id, count = payload.get("openid"), payload.get("template_id"), payload.get("count", 1)
        if not openid or not template_id or not isinstance(count, int) or count < 1:
            return _json_response({"error": "openid_template_id_and_positive_count_required"}, 400)
        with state.lock:
            key = (openid, template_id)
            state.grants[key] = state.grants.get(key, 0) + count
            remaining = state.grants[key]
        return _json_response({"openid": openid, "template_id": template_id, "remaining": remaining})

    @app.post("/sim/pay")
    def sim_pay():
        """The user completes wx.requestPayment for this order."""
        payload = body_json() or {}
        out_trade_no = payload.get("out_trade_no")
        with state.lock:
            order = state.orders.get(out_trade_no or "")
            if not order:
                return _json_response({"error": "order_not_found"}, 404)
            if order["trade_state"] != "NOTPAY":
                return _json_response({"error": "order_not_payable", "trade_state": order["trade_state"]}, 409)
            order["trade_state"] = "SUCCESS"
            order["transaction_id"] = "42" + datetime.now(CHINA_TZ).strftime("%Y%m%d") + secrets.token_hex(9)
            order["success_time"] = _rfc3339_now()
            record = new_notification("transaction", "TRANSACTION.SUCCESS", "支付成功", order["notify_url"],
                                      transaction_view(order))
            result = {"out_trade_no": out_trade_no, "transaction_id": order["transaction_id"],
                      "notification_id": record["id"]}
        if payload.get("deliver", True):
            outcome = deliver(record["id"])
            result.update(status_code=outcome["status_code"], error=outcome["error"], delivered=outcome["delivered"])
        else:
            result.update(status_code=None, error=None, delivered=False)
        return _json_response(result)

    @app.post("/sim/redeliver")
    def sim_redeliver():
        """Send a stored notification again (same id and body). copies>1 sends them concurrently."""
        payload = body_json() or {}
        notification_id = payload.get("notification_id")
        copies = int(payload.get("copies", 1))
        resign = bool(payload.get("resign", True))
        with state.lock:
            if notification_id not in state.notifications:
                return _json_response({"error": "notification_not_found"}, 404)
        if copies < 1 or copies > 500:
            return _json_response({"error": "copies_out_of_range"}, 400)
        if copies == 1:
            outcomes = [deliver(notification_id, resign)]
        else:
            outcomes: list = [None] * copies
            barrier = threading.Barrier(copies)

            def send(index):
                barrier.wait()
                outcomes[index] = deliver(notification_id, resign)

            threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(copies)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return _json_response({"notification_id": notification_id, "status_code": outcomes[0]["status_code"],
                               "deliveries": outcomes})

    @app.post("/sim/refunds/settle")
    def sim_settle_refunds():
        """Settle PROCESSING refunds now (all, or the one named). On return every such refund is settled and its
        callback delivery attempt is over, including settlements the timer had already started."""
        wanted = (body_json() or {}).get("out_refund_no")
        with state.lock:
            pending = [no for no, r in state.refunds.items() if r["status"] == "PROCESSING" and wanted in (None, no)]
            events = [event for no, event in state.refund_settled.items() if wanted in (None, no)]
        outcomes = [outcome for no in pending if (outcome := settle_refund(no)) is not None]
        for event in events:
            event.wait(callback_timeout_s + 1)
        return _json_response({"settled": pending, "deliveries": outcomes})

    @app.post("/sim/faults")
    def sim_fault():
        payload = body_json() or {}
        mode = payload.get("mode")
        count = payload.get("count", 1)
        if mode not in FAULT_MODES or not isinstance(count, int) or count < 1:
            return _json_response({"error": "bad_fault", "modes": list(FAULT_MODES)}, 400)
        fault = {"path_prefix": payload.get("path_prefix") or "/", "mode": mode, "count": count,
                 "delay_s": float(payload.get("delay_s") or 15.0)}
        with state.lock:
            state.faults.append(fault)
        return _json_response(fault)

    @app.post("/sim/tokens/revoke")
    def sim_revoke_tokens():
        with state.lock:
            revoked = len(state.tokens)
            state.tokens.clear()
        return _json_response({"revoked": revoked})

    @app.post("/sim/reset")
    def sim_reset():
        with state.lock:
            state.reset()
        return _json_response({"ok": True})

    @app.get("/sim/stats")
    def sim_stats():
        with state.lock:
            return _json_response({"token_issued": state.token_issued, "orders": len(state.orders),
                                   "refunds": len(state.refunds), "notifications": len(state.notifications),
                                   "messages": len(state.messages)})

    @app.get("/sim/notifications")
    def sim_notifications():
        with state.lock:
            return _json_response([{key: value for key, value in record.items() if key != "headers"}
                                   for record in state.notifications.values()])

    @app.get("/sim/refunds")
    def sim_refunds():
        with state.lock:
            return _json_response([{**refund_view(r), "reason": r["reason"], "notify_url": r["notify_url"],
                                    "notification_ids": list(r["notification_ids"])}
                                   for r in state.refunds.values()])

    @app.get("/sim/orders")
    def sim_orders():
        with state.lock:
            return _json_response([{**transaction_view(o), "notify_url": o["notify_url"],
                                    "prepay_id": o.get("prepay_id")} for o in state.orders.values()])

    @app.get("/sim/messages")
    def sim_messages():
        with state.lock:
            return _json_response(list(state.messages))

    return app
