"""The state behind the simulated WeChat servers and the work more than one API family does on it: users' openids,
login codes, tokens, orders, refunds, armed faults, and the signed callbacks WeChat Pay delivers to notify_urls."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from dataclasses import replace
from typing import Callable

import requests
from flask import current_app

from wechat_sim.keys import SimCredentials
from wechat_sim.media_checks import MediaChecks
from wechat_sim.push import PushConfig, sha1_signature, signed_push
from wechat_sim.redelivery import REDELIVERY_INTERVALS_S, RedeliveryScheduler
from wechat_sim.signing import PlatformSigner, load_public_key, rfc3339_now

LOGIN_CODE_TTL_S = 300
# A getPhoneNumber code, like a wx.login code, is good for five minutes and one exchange.
PHONE_CODE_TTL_S = 300
# Automatic redelivery is off unless asked for (redelivery_scale=1.0 is WeChat Pay's real pace, 15 s to the first
# retry): a refused callback is then delivered exactly once, which tests that count deliveries or leave a callback
# refused for a while rely on. The command-line simulator (runner.main) turns it on at the real pace.
DEFAULT_REDELIVERY_SCALE: float | None = None
FAULT_MODES = ("5xx", "timeout", "not_enough", "refund_abnormal", "refund_closed", "xpay_refund_failed")

PUSH_KIND = "push"
# Virtual payment's pushes are answered {"ErrCode": 0, "ErrMsg": "success"}; every other push `success`.
JSON_ANSWERED_EVENTS = ("xpay_goods_deliver_notify", "xpay_refund_notify")

_TRADE_STATE_DESC = {"NOTPAY": "订单未支付", "SUCCESS": "支付成功", "CLOSED": "订单已关闭", "REFUND": "转入退款"}
_REFUND_SUMMARY = {"SUCCESS": "退款成功", "ABNORMAL": "退款异常", "CLOSED": "退款关闭"}


class SimState:
    def __init__(self):
        self.lock = threading.RLock()
        self.reset()

    def reset(self):
        self.openid_by_user: dict[str, str] = {}
        self.login_codes: dict[str, dict] = {}
        self.phone_codes: dict[str, dict] = {}
        self.tokens: dict[str, float] = {}
        self.token_issued = 0
        self.grants: dict[tuple[str, str], int] = {}
        self.messages: list[dict] = []
        self.orders: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.notifications: dict[str, dict] = {}
        self.faults: list[dict] = []
        # The session_key code2session last issued to each openid (what wx.requestVirtualPayment's signature uses).
        self.session_keys: dict[str, str] = {}
        self.xpay_orders: dict[str, dict] = {}
        self.xpay_refunds: dict[str, dict] = {}
        self.xpay_refund_calls = 0
        # Set once a refund's outcome is decided and its callback delivery attempt is over.
        self.refund_settled: dict[str, threading.Event] = {}


class WeChatSimulator:
    """One simulated WeChat (an app and a merchant). Refunds stay PROCESSING until settle_refund, which keeps tests
    deterministic; with refund_settle_delay_s they also settle by themselves that long after being requested, as
    WeChat does. login_code_ttl_s is asked on every code exchange, so a running simulator's codes can be expired.

    A payment or refund callback the notify_url does not acknowledge (any answer but 2xx, a timeout, a connection
    error) is delivered again on WeChat Pay's schedule (REDELIVERY_INTERVALS_S) multiplied by redelivery_scale,
    until one is acknowledged or the last retry fails; with redelivery_scale=None (the default) there is no
    automatic redelivery: each callback is delivered exactly once unless /sim/redeliver asks again."""

    def __init__(self, creds: SimCredentials, *, refund_settle_delay_s: float | None = None,
                 callback_timeout_s: float = 5.0, login_code_ttl_s: Callable[[], float] = lambda: LOGIN_CODE_TTL_S,
                 redelivery_scale: float | None = DEFAULT_REDELIVERY_SCALE,
                 redelivery_intervals_s: tuple[float, ...] = REDELIVERY_INTERVALS_S, push_url: str | None = None,
                 push_mode: str = "safe", push_format: str = "json"):
        self.creds = creds
        # The message push configured in the mini-program's console (one per mini-program: URL, Token,
        # EncodingAESKey, mode, format): every push, media-check verdicts and virtual payment's alike, is signed and
        # encrypted with it (push_http); it survives reset.
        self.push = PushConfig(url=push_url, token=creds.push_token, aes_key=creds.push_aes_key, mode=push_mode,
                               data_format=push_format)
        self.started_push = self.push
        self.state = SimState()
        self.merchant_public_key = load_public_key(creds.merchant_public_key_pem)
        self.signer = PlatformSigner.from_credentials(creds)
        self.refund_settle_delay_s = refund_settle_delay_s
        self.callback_timeout_s = callback_timeout_s
        self._login_code_ttl_s = login_code_ttl_s
        self.redelivery = (None if redelivery_scale is None
                           else RedeliveryScheduler(self, redelivery_scale, redelivery_intervals_s))
        self.media_checks = MediaChecks(self)

    @property
    def push_url(self) -> str | None:
        return self.push.url

    @push_url.setter
    def push_url(self, url: str | None) -> None:
        self.push = replace(self.push, url=url)

    def reset(self) -> None:
        """Forget everything, pending redeliveries and media checks included; the message push is configured as it
        was at start."""
        self.push = self.started_push
        self.media_checks.reset()
        with self.state.lock:
            self.state.reset()
            if self.redelivery is not None:
                self.redelivery.clear()

    def stop(self) -> None:
        """End automatic redelivery (its thread included); nothing else here runs by itself for long."""
        if self.redelivery is not None:
            self.redelivery.stop()

    def redelivery_config(self) -> dict:
        scheduler = self.redelivery
        return {"enabled": scheduler is not None, "scale": scheduler.scale if scheduler else None,
                "intervals_s": list(scheduler.intervals if scheduler else REDELIVERY_INTERVALS_S),
                "queued": scheduler.pending() if scheduler else 0}

    # ---------------------------------------------------------------- mini-program users and tokens

    def openid_for(self, user_name: str) -> str:
        creds = self.creds
        digest = hmac.new(creds.app_secret.encode(), f"{creds.appid}:{user_name}".encode(), hashlib.sha256).digest()
        return "o" + base64.urlsafe_b64encode(digest).decode("ascii")[:27]

    def login_code_expired(self, issued_at: float) -> bool:
        return time.time() - issued_at > self._login_code_ttl_s()

    def phone_code_expired(self, issued_at: float) -> bool:
        return time.time() - issued_at > PHONE_CODE_TTL_S

    def token_valid(self, token: str | None) -> tuple[bool, int]:
        """(valid, errcode): 40001 for a token never issued or revoked, 42001 for an expired one."""
        with self.state.lock:
            expires_at = self.state.tokens.get(token or "")
        if expires_at is None:
            return False, 40001
        if expires_at < time.time():
            return False, 42001
        return True, 0

    # ---------------------------------------------------------------- faults

    def take_fault(self, path: str, modes: tuple[str, ...]) -> dict | None:
        """Consume one armed fault of these modes whose prefix covers path; a copy of it, or None."""
        with self.state.lock:
            for fault in self.state.faults:
                if fault["count"] > 0 and fault["mode"] in modes and path.startswith(fault["path_prefix"]):
                    fault["count"] -= 1
                    return dict(fault)
        return None

    # ---------------------------------------------------------------- WeChat Pay views

    @staticmethod
    def transaction_view(order: dict) -> dict:
        view = {
            "appid": order["appid"], "mchid": order["mchid"], "out_trade_no": order["out_trade_no"],
            "trade_type": "JSAPI", "trade_state": order["trade_state"],
            "trade_state_desc": _TRADE_STATE_DESC[order["trade_state"]],
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

    @staticmethod
    def refund_view(refund: dict) -> dict:
        view = {key: refund[key] for key in ("refund_id", "out_refund_no", "transaction_id", "out_trade_no",
                                             "channel", "user_received_account", "create_time", "status",
                                             "funds_account")}
        view["amount"] = dict(refund["amount"])
        view["promotion_detail"] = []
        if refund.get("success_time"):
            view["success_time"] = refund["success_time"]
        return view

    # ---------------------------------------------------------------- callbacks

    def new_notification(self, kind: str, event_type: str, summary: str, url: str | None, plain: dict) -> dict:
        """Caller holds the lock."""
        notification_id = str(uuid.uuid4())
        body = self.signer.notification_body(plain, kind=kind, event_type=event_type, summary=summary,
                                             notification_id=notification_id)
        record = {"id": notification_id, "kind": kind, "event_type": event_type, "url": url, "body": body,
                  "resource": plain, "created_at": time.time(), "headers": None, "deliveries": [],
                  # status: not_scheduled | pending (a retry is queued) | acknowledged | gave_up | stopped
                  "redelivery": {"status": "not_scheduled", "retries": 0, "next_retry": None,
                                 "next_attempt_at": None, "acknowledged_at": None, "gave_up_at": None}}
        self.state.notifications[notification_id] = record
        return record

    def deliver(self, notification_id: str, resign: bool = True, *, trigger: str = "manual",
                retry: int | None = None) -> dict:
        """POST one notification to its notify_url, as WeChat does on every (re)delivery, and record the attempt
        (trigger: "initial", "redelivery" (retry: its 1-based number) or "manual"). A 2xx acknowledges the
        notification, which ends its automatic redelivery. Never holds the lock while waiting on the receiver,
        which may well call back into the simulator."""
        state = self.state
        with state.lock:
            record = state.notifications[notification_id]
            body, url, is_push = record["body"], record["url"], record["kind"] == PUSH_KIND
            if not is_push:
                headers = record["headers"] if (record["headers"] and not resign) else self.signer.headers(body)
                record["headers"] = headers
        outcome = {"notification_id": notification_id, "trigger": trigger, "retry": retry, "status_code": None,
                   "error": None, "at": time.time()}
        response = None
        if is_push:
            outcome.update(self.push_http(record["resource"]))
        elif not url:
            outcome["error"] = "no_notify_url"
        else:
            try:
                response = requests.post(url, data=body.encode("utf-8"), timeout=self.callback_timeout_s, headers={
                    **headers, "Content-Type": "application/json", "User-Agent": "Mozilla/4.0"})
                outcome["status_code"] = response.status_code
            except requests.Timeout:
                outcome["error"] = "timeout"
            except requests.RequestException as error:
                outcome["error"] = f"connection_error: {type(error).__name__}"
        outcome["finished_at"] = time.time()
        if not is_push:
            # WeChat Pay takes any 2xx as the merchant's acknowledgement (its docs answer 200 or 204).
            outcome["delivered"] = outcome["status_code"] is not None and 200 <= outcome["status_code"] < 300
        with state.lock:
            record["deliveries"].append(outcome)
            if outcome["delivered"] and record["redelivery"]["status"] in ("not_scheduled", "pending"):
                record["redelivery"].update(status="acknowledged", next_retry=None, next_attempt_at=None,
                                            acknowledged_at=outcome["finished_at"])
                if is_push and record.get("on_acknowledged") is not None:
                    record["on_acknowledged"]()
        return outcome

    def push_http(self, message: dict, config: PushConfig | None = None, *, appid: str | None = None,
                  **signing) -> dict:
        """POST one message push to the configured URL, freshly signed (and in safe mode encrypted) as WeChat sends
        every push and every retry of one; the outcome. `config`, `appid` (encrypted for) and `signing` (timestamp,
        nonce) let the control API send pushes signed with other keys, to see them refused. A virtual-payment push
        counts as answered only by the JSON {"ErrCode": 0, ...}, any other by `success` (or an empty body), with 200;
        anything else (another ErrCode, an HTTP error, no answer) is pushed again."""
        config = config or self.push
        outcome = {"at": time.time(), "status_code": None, "body": None, "error": None, "delivered": False}
        if not config.url:
            outcome["error"] = "no_push_url"
            return outcome
        params, body, content_type = signed_push(config, appid or self.creds.appid, self.creds.original_id,
                                                 message, **signing)
        try:
            response = requests.post(config.url, params=params, data=body, timeout=self.callback_timeout_s,
                                     headers={"Content-Type": content_type, "User-Agent": "Mozilla/4.0"})
        except requests.RequestException as error:
            outcome["error"] = "timeout" if isinstance(error, requests.Timeout) else \
                f"connection_error: {type(error).__name__}"
            return outcome
        outcome.update(status_code=response.status_code, body=response.text[:200])
        if message.get("Event") in JSON_ANSWERED_EVENTS:
            outcome["reply"] = push_reply(response)
            outcome["delivered"] = outcome["reply"] is not None and outcome["reply"].get("ErrCode") == 0
        else:
            outcome["delivered"] = response.status_code == 200 and response.text.strip() in ("success", "")
        return outcome

    def new_push(self, message: dict, on_acknowledged: Callable[[], None] | None = None) -> dict:
        """A message-push event to the configured push URL, redelivered until answered; caller holds the lock.
        on_acknowledged runs (under the lock) when the app first answers ErrCode 0."""
        notification_id = str(uuid.uuid4())
        record = {"id": notification_id, "kind": PUSH_KIND, "event_type": message["Event"], "url": self.push_url,
                  "body": json.dumps(message, ensure_ascii=False), "resource": message, "created_at": time.time(),
                  "headers": None, "deliveries": [], "on_acknowledged": on_acknowledged,
                  "redelivery": {"status": "not_scheduled", "retries": 0, "next_retry": None,
                                 "next_attempt_at": None, "acknowledged_at": None, "gave_up_at": None}}
        self.state.notifications[notification_id] = record
        return record

    def deliver_first(self, notification_id: str) -> dict:
        """The first delivery of a new notification; when it is not acknowledged, WeChat Pay's retries follow."""
        outcome = self.deliver(notification_id, trigger="initial")
        if not outcome["delivered"] and outcome["error"] not in ("no_notify_url", "no_push_url"):
            with self.state.lock:
                record = self.state.notifications.get(notification_id)
                if record is not None and record["redelivery"]["status"] == "not_scheduled":
                    self._queue_retry(record, 0)
        return outcome

    def _queue_retry(self, record: dict, retry: int) -> None:
        """Caller holds the lock. retry is 0-based: the wait before it is the retry-th interval."""
        if self.redelivery is None:
            return
        if retry >= len(self.redelivery.intervals):
            record["redelivery"].update(status="gave_up", next_retry=None, next_attempt_at=None,
                                        gave_up_at=time.time())
            return
        due = self.redelivery.schedule(record["id"], retry)
        if due is None:
            record["redelivery"].update(status="stopped", next_retry=None, next_attempt_at=None)
        else:
            record["redelivery"].update(status="pending", next_retry=retry, next_attempt_at=due)

    def redeliver_due(self, notification_id: str, retry: int) -> dict | None:
        """The scheduler's work when a retry falls due: deliver it unless the notification is gone (reset) or no
        longer waits for this retry, then queue the next retry or give up. The outcome, or None when skipped."""
        state = self.state
        with state.lock:
            record = state.notifications.get(notification_id)
            if record is None or record["redelivery"]["status"] != "pending" \
                    or record["redelivery"]["next_retry"] != retry:
                return None
        outcome = self.deliver(notification_id, trigger="redelivery", retry=retry + 1)
        with state.lock:
            if state.notifications.get(notification_id) is not record:
                return outcome  # reset meanwhile
            record["redelivery"]["retries"] += 1
            if record["redelivery"]["status"] == "pending" and record["redelivery"]["next_retry"] == retry:
                self._queue_retry(record, retry + 1)
        return outcome

    # ---------------------------------------------------------------- refunds

    def settle_refund(self, out_refund_no: str) -> dict | None:
        """Decide a PROCESSING refund (SUCCESS, or what an armed refund fault says) and deliver its callback; the
        delivery outcome, or None when there was nothing to settle."""
        state = self.state
        with state.lock:
            refund = state.refunds.get(out_refund_no)
            if refund is None or refund["status"] != "PROCESSING":
                return None  # settled already (or being settled), or the simulator was reset meanwhile
            done = state.refund_settled[out_refund_no]
            outcome_fault = self.take_fault("/v3/refund/domestic/refunds", ("refund_abnormal", "refund_closed"))
            if outcome_fault is None:
                refund["status"] = "SUCCESS"
                refund["success_time"] = rfc3339_now()
                state.orders[refund["out_trade_no"]]["trade_state"] = "REFUND"
            else:
                refund["status"] = "ABNORMAL" if outcome_fault["mode"] == "refund_abnormal" else "CLOSED"
            plain = {
                "mchid": self.creds.mchid, "out_trade_no": refund["out_trade_no"],
                "transaction_id": refund["transaction_id"], "out_refund_no": refund["out_refund_no"],
                "refund_id": refund["refund_id"], "refund_status": refund["status"],
                "user_received_account": refund["user_received_account"],
                "amount": {key: refund["amount"][key] for key in ("total", "refund", "payer_total", "payer_refund")},
            }
            if refund.get("success_time"):
                plain["success_time"] = refund["success_time"]
            record = self.new_notification("refund", f"REFUND.{refund['status']}", _REFUND_SUMMARY[refund["status"]],
                                           refund["notify_url"], plain)
            refund["notification_ids"].append(record["id"])
        try:
            return self.deliver_first(record["id"])
        finally:
            done.set()

    def schedule_settlement(self, out_refund_no: str) -> None:
        if self.refund_settle_delay_s is None:
            return
        timer = threading.Timer(self.refund_settle_delay_s, self.settle_refund, args=(out_refund_no,))
        timer.daemon = True
        timer.start()


def push_query(token: str) -> dict:
    """The query string WeChat signs every message push with (plaintext mode): signature = SHA-1 of the token,
    timestamp and nonce sorted as strings and joined."""
    timestamp, nonce = str(int(time.time())), str(secrets.randbelow(10**10))
    return {"signature": sha1_signature(token, timestamp, nonce), "timestamp": timestamp, "nonce": nonce}


def push_reply(response) -> dict | None:
    """The JSON object a push was answered with, or None (no answer, an HTTP error, not a JSON object)."""
    if response is None or response.status_code != 200:
        return None
    try:
        reply = response.json()
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def current_simulator() -> WeChatSimulator:
    """The simulator behind the app handling the current request."""
    return current_app.extensions["wechat_sim"]
