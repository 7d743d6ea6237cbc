"""A Flask app that plays WeChat's servers: mini-program login, access token, subscribe messages, mini-program
codes, content security (mediaCheckAsync and its message pushes), WeChat Pay v3 (JSAPI prepay, query, close, refunds,
signed and encrypted callbacks) and virtual payment (xpay: requestVirtualPayment, query_order, refund_order,
goods-deliver and refund pushes).

Each API family is a blueprint (miniprogram, pay, xpay, control) working on one WeChatSimulator; this module puts them
together and adds what applies across families: armed faults, merchant authentication and signed /v3/ responses,
for every path including ones no route matches. Control endpoints under /sim/ let tests and developers act as the
user ("pay"), read what was sent and inject faults.
"""
from __future__ import annotations

import secrets
import time

from flask import Flask, Response, request

from wechat_sim import control, miniprogram, pay, security, xpay
from wechat_sim.keys import SimCredentials
from wechat_sim.redelivery import REDELIVERY_INTERVALS_S
from wechat_sim.simulator import DEFAULT_REDELIVERY_SCALE, LOGIN_CODE_TTL_S, WeChatSimulator, current_simulator
from wechat_sim.web import json_response, v3_error

__all__ = ["DEFAULT_REDELIVERY_SCALE", "LOGIN_CODE_TTL_S", "REDELIVERY_INTERVALS_S", "create_sim_app"]

_REQUEST_FAULT_MODES = ("5xx", "timeout", "not_enough")


def create_sim_app(creds: SimCredentials, *, refund_settle_delay_s: float | None = None,
                   callback_timeout_s: float = 5.0,
                   redelivery_scale: float | None = DEFAULT_REDELIVERY_SCALE, push_url: str | None = None,
                   push_mode: str = "safe", push_format: str = "json") -> Flask:
    """Refunds stay PROCESSING until POST /sim/refunds/settle, which keeps tests deterministic; with
    refund_settle_delay_s they also settle by themselves that long after being requested, as WeChat does.

    With redelivery_scale set, a callback not acknowledged with a 2xx within callback_timeout_s is delivered
    again after WeChat Pay's intervals (REDELIVERY_INTERVALS_S, 15 s up to 6 h, about 24 h in all) times the
    scale (1.0: the real pace; tests compress it with e.g. 0.001), until a 2xx or the last retry. None, the
    default, is no automatic redelivery: every callback is delivered once, and again only when /sim/redeliver
    asks. app.extensions["wechat_sim"].stop() ends the redelivery thread (RunningSimulator.stop does).

    push_url, push_mode (plaintext | safe) and push_format (json | xml) are the message push as configured in
    WeChat's console: where the verdicts of security.mediaCheckAsync and virtual payment's pushes go, all signed
    and encrypted alike (POST /sim/push-config changes them on a running simulator; POST /sim/push-url its URL)."""
    # This module's LOGIN_CODE_TTL_S is read on every code exchange, so tests can shorten it on a running app.
    simulator = WeChatSimulator(creds, refund_settle_delay_s=refund_settle_delay_s,
                                callback_timeout_s=callback_timeout_s, login_code_ttl_s=lambda: LOGIN_CODE_TTL_S,
                                redelivery_scale=redelivery_scale, push_url=push_url, push_mode=push_mode,
                                push_format=push_format)
    app = Flask("wechat_sim")
    app.extensions["wechat_sim"] = simulator
    app.extensions["wechat_sim_state"] = simulator.state
    app.before_request(_inject_faults_and_authenticate)
    app.after_request(_sign_pay_responses)
    app.register_blueprint(miniprogram.blueprint)
    app.register_blueprint(pay.blueprint)
    app.register_blueprint(xpay.blueprint)
    app.register_blueprint(security.blueprint)
    app.register_blueprint(control.blueprint)
    return app


def _inject_faults_and_authenticate() -> Response | None:
    path = request.path
    if path.startswith("/sim/"):
        return None
    sim = current_simulator()
    fault = sim.take_fault(path, _REQUEST_FAULT_MODES)
    if fault and fault["mode"] == "5xx":
        if path.startswith("/v3/"):
            return v3_error(500, "SYSTEM_ERROR", "系统错误 (simulated)")
        return json_response({"errcode": -1, "errmsg": "system error (simulated)"}, 500)
    if fault and fault["mode"] == "timeout":
        # The request is still carried out after the delay: the caller cannot know whether it happened.
        time.sleep(fault["delay_s"])
    if path.startswith("/v3/"):
        refused = pay.authenticate_merchant(sim)
        if refused is None and fault and fault["mode"] == "not_enough":
            # What WeChat Pay answers when the merchant's balance cannot cover a refund; nothing is created.
            return v3_error(403, "NOT_ENOUGH", "基本账户余额不足，请充值后重新发起")
        return refused
    return None


def _sign_pay_responses(response: Response) -> Response:
    if request.path.startswith("/v3/"):
        body = response.get_data(as_text=True)
        response.headers.update(current_simulator().signer.headers(body))
        response.headers["Request-ID"] = secrets.token_hex(16)
    return response
