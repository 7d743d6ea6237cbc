"""Drive the simulator's control endpoints: act as the user in WeChat and inspect what WeChat sent."""
from __future__ import annotations

import requests


class SimulatorClient:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()

    def _post(self, path: str, payload: dict | None = None):
        response = self._http.post(self.base_url + path, json=payload or {}, timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def _get(self, path: str):
        response = self._http.get(self.base_url + path, timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def login(self, user_name: str) -> dict:
        """wx.login for a simulated user: {code, openid}. The openid is stable per user name."""
        return self._post("/sim/login", {"user": user_name})

    def login_code(self, user_name: str) -> str:
        return self.login(user_name)["code"]

    def openid_of(self, user_name: str) -> str:
        return self.login(user_name)["openid"]

    def phone_code(self, user_name: str, phone: str, country_code: str = "86", appid: str | None = None) -> str:
        """The code of a getPhoneNumber button the user allowed, for this phone (single use, five minutes)."""
        return self._post("/sim/phone_code", {"user": user_name, "phone": phone, "country_code": country_code,
                                              "appid": appid})["code"]

    def pay(self, out_trade_no: str, deliver: bool = True) -> dict:
        """{out_trade_no, transaction_id, notification_id, status_code, error, delivered}."""
        return self._post("/sim/pay", {"out_trade_no": out_trade_no, "deliver": deliver})

    def xpay_pay(self, openid: str, xpay_params: dict, platform: str = "android", deliver: bool = True) -> dict:
        """The user completes wx.requestVirtualPayment with the order's xpay_params: {out_trade_no, wx_order_id,
        notification_id, status_code, error, delivered, reply}. Raises for refused signatures (HTTP 400)."""
        return self._post("/sim/xpay/pay", {"openid": openid, "sign_data": xpay_params["signData"],
                                            "pay_sig": xpay_params["paySig"], "signature": xpay_params["signature"],
                                            "mode": xpay_params.get("mode"), "platform": platform,
                                            "deliver": deliver})

    def xpay_pay_response(self, payload: dict):
        """The raw answer to /sim/xpay/pay (for refusals)."""
        return self._http.post(self.base_url + "/sim/xpay/pay", json=payload, timeout=self.timeout)

    def set_push_url(self, url: str | None) -> dict:
        return self._post("/sim/push-url", {"url": url})

    def xpay_settle_refunds(self, refund_order_id: str | None = None) -> dict:
        return self._post("/sim/xpay/refunds/settle", {"refund_order_id": refund_order_id})

    def xpay_orders(self) -> list:
        return self._get("/sim/xpay/orders")

    def xpay_refunds(self) -> dict:
        """{calls: refund_order calls received (refused ones too), refunds: [...]}."""
        return self._get("/sim/xpay/refunds")

    def redeliver(self, notification_id: str, copies: int = 1, resign: bool = True) -> dict:
        """{notification_id, status_code (first delivery), deliveries:[{status_code, error, delivered}]}."""
        return self._post("/sim/redeliver", {"notification_id": notification_id, "copies": copies,
                                             "resign": resign})

    def settle_refunds(self, out_refund_no: str | None = None) -> dict:
        return self._post("/sim/refunds/settle", {"out_refund_no": out_refund_no})

    def notifications(self) -> list:
        """Every notification with its deliveries and its "redelivery" state (status: not_scheduled | pending |
        acknowledged | gave_up | stopped, retries made, next_attempt_at)."""
        return self._get("/sim/notifications")

    def deliveries(self, notification_id: str | None = None) -> list:
        """Every delivery attempt, oldest first: {notification_id, trigger ("initial" | "redelivery" | "manual"),
        retry (1-based, for redeliveries), at, finished_at, status_code, error, delivered, kind, event_type, url}."""
        path = "/sim/deliveries" + (f"?notification_id={notification_id}" if notification_id else "")
        return self._get(path)

    def stats(self) -> dict:
        return self._get("/sim/stats")

    def refunds(self) -> list:
        return self._get("/sim/refunds")

    def orders(self) -> list:
        return self._get("/sim/orders")

    def messages(self) -> list:
        return self._get("/sim/messages")

    def grant_subscription(self, openid: str, template_id: str, count: int = 1) -> dict:
        return self._post("/sim/subscribe-grants", {"openid": openid, "template_id": template_id, "count": count})

    def set_fault(self, path_prefix: str, mode: str, count: int = 1, delay_s: float | None = None) -> dict:
        """mode: "5xx" | "timeout" (sleeps delay_s, default 15 s, then answers) | "not_enough" (403 NOT_ENOUGH
        from a WeChat Pay API, nothing done) | "refund_abnormal" | "refund_closed" | "xpay_refund_failed" (the next
        xpay refund settled fails; path_prefix "/xpay/refund_order")."""
        return self._post("/sim/faults", {"path_prefix": path_prefix, "mode": mode, "count": count,
                                          "delay_s": delay_s})

    def revoke_tokens(self) -> int:
        return self._post("/sim/tokens/revoke")["revoked"]

    def reset(self) -> None:
        self._post("/sim/reset")

    def token_issued_count(self) -> int:
        return self._get("/sim/stats")["token_issued"]

    # ------------------------------------------------------------------------------------ content security

    def configure_push(self, url: str | None = None, mode: str | None = None, data_format: str | None = None) -> dict:
        """The message push as set in WeChat's console: url, mode (plaintext | safe), data_format (json | xml)."""
        return self._post("/sim/push-config", {"url": url, "mode": mode, "data_format": data_format})

    def configure_media_checks(self, **settings) -> dict:
        """Defaults of every check: suggest, label, delay_s, minute_limit, day_limit, push_retries,
        push_retry_interval_s, fetch_timeout_s."""
        return self._post("/sim/media-checks/config", settings)

    def media_check_rule(self, suggest: str = "pass", *, openid: str | None = None, media_type: int | None = None,
                         count: int | None = None, hold: bool = False, lose: bool = False,
                         delay_s: float | None = None, errcode: int = 0) -> dict:
        """How the next checks (count of them, or all) of this openid / media type are judged and pushed."""
        return self._post("/sim/media-checks/rules", {"suggest": suggest, "openid": openid, "media_type": media_type,
                                                       "count": count, "hold": hold, "lose": lose,
                                                       "delay_s": delay_s, "errcode": errcode})

    def flush_media_checks(self, trace_id: str | None = None, include_held: bool = False) -> dict:
        """Push every scheduled verdict now (held ones too if asked) and wait until every push under way is over:
        {delivered, deliveries}."""
        return self._post("/sim/media-checks/flush", {"trace_id": trace_id, "include_held": include_held})

    def forge_media_push(self, **fields) -> dict:
        """Send a wxa_media_check push signed or encrypted with other keys (token, aes_key, appid, mode,
        timestamp, nonce, trace_id, suggest): what the push URL answered."""
        return self._post("/sim/media-checks/forge", fields)

    def media_checks(self) -> list:
        return self._get("/sim/media-checks")

    def media_check_stats(self) -> dict:
        return self._get("/sim/media-checks/stats")
