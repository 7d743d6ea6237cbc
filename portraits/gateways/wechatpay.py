"""WeChat Pay v3 for the mini-program, through wechatpayv3 in platform-public-key mode.

Requests are signed with the merchant key and responses verified by the SDK; callbacks are checked here step by
step (headers, serial, signature, age, decryption) so a rejection says exactly why.
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import requests
from wechatpayv3 import WeChatPay, WeChatPayType
from wechatpayv3.utils import aes_decrypt, load_public_key, rsa_verify

DEFAULT_API_BASE_URL = "https://api.mch.weixin.qq.com"
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
CALLBACK_HEADERS = ("wechatpay-timestamp", "wechatpay-nonce", "wechatpay-signature", "wechatpay-serial")
# Throttling is temporary even though it is a 4xx.
RETRYABLE_CLIENT_STATUSES = {429}


class PaymentGatewayError(Exception):
    def __init__(self, code: str, message: str = "", *, retryable: bool, http_status: int | None = None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.http_status = http_status


class CallbackRejected(Exception):
    """http_status: 401 when the message cannot be trusted, 400 when it is genuine but not for us."""

    def __init__(self, code: str, message: str = "", http_status: int = 401):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.http_status = http_status


@dataclass
class Notification:
    id: str
    event_type: str
    create_time: str
    resource: dict


class PaymentGateway:
    def __init__(self, *, mchid: str, appid: str, private_key_pem: str, cert_serial_no: str, apiv3_key: str,
                 public_key_pem: str, public_key_id: str, api_base_url: str | None, notify_url: str,
                 refund_notify_url: str, timeout: float = 10, callback_max_age_s: int = 300):
        self._mchid = mchid
        self._appid = appid
        self._apiv3_key = apiv3_key
        self._public_key_id = public_key_id
        self._public_key = load_public_key(public_key_pem)
        self._refund_notify_url = refund_notify_url
        self._callback_max_age_s = callback_max_age_s
        self._pay = WeChatPay(
            wechatpay_type=WeChatPayType.MINIPROG, mchid=mchid, private_key=private_key_pem,
            cert_serial_no=cert_serial_no, appid=appid, apiv3_key=apiv3_key, notify_url=notify_url,
            timeout=timeout, public_key=public_key_pem, public_key_id=public_key_id,
        )
        # wechatpayv3 has no public setting for the host; its Core keeps it here.
        self._pay._core._gate_way = (api_base_url or DEFAULT_API_BASE_URL).rstrip("/")

    # ------------------------------------------------------------------ outgoing calls

    def _call(self, operation, *args, **kwargs) -> tuple[int, dict]:
        try:
            status, body = operation(*args, **kwargs)
        except requests.Timeout as error:
            raise PaymentGatewayError("wechatpay_timeout", str(error), retryable=True) from error
        except requests.RequestException as error:
            raise PaymentGatewayError("wechatpay_unreachable", type(error).__name__, retryable=True) from error
        except Exception as error:  # wechatpayv3 raises bare Exception, e.g. when a response signature fails
            code = "bad_response_signature" if "signature" in str(error).lower() else "wechatpay_client_error"
            raise PaymentGatewayError(code, str(error), retryable=False) from error
        payload = _json_or_empty(body)
        if 200 <= status < 300:
            return status, payload
        wechat_code = str(payload.get("code") or f"http_{status}").lower()
        retryable = status >= 500 or status in RETRYABLE_CLIENT_STATUSES
        raise PaymentGatewayError(wechat_code, str(payload.get("message", "")), retryable=retryable,
                                  http_status=status)

    def prepay(self, order_id: str, amount_fen: int, description: str, openid: str) -> str:
        _, payload = self._call(self._pay.pay, description=description, out_trade_no=order_id,
                                amount={"total": int(amount_fen), "currency": "CNY"}, payer={"openid": openid},
                                pay_type=WeChatPayType.MINIPROG)
        prepay_id = payload.get("prepay_id")
        if not prepay_id:
            raise PaymentGatewayError("missing_prepay_id", "prepay answered without prepay_id", retryable=True)
        return prepay_id

    def pay_params(self, prepay_id: str) -> dict:
        """What wx.requestPayment needs, signed with the merchant key."""
        time_stamp = str(int(time.time()))
        nonce_str = secrets.token_hex(16)
        package = f"prepay_id={prepay_id}"
        pay_sign = self._pay.sign([self._appid, time_stamp, nonce_str, package])
        return {"appId": self._appid, "timeStamp": time_stamp, "nonceStr": nonce_str, "package": package,
                "signType": "RSA", "paySign": pay_sign}

    def query_order(self, order_id: str) -> dict | None:
        try:
            _, payload = self._call(self._pay.query, out_trade_no=order_id)
        except PaymentGatewayError as error:
            if error.code == "order_not_exist":
                return None
            raise
        return payload

    def close_order(self, order_id: str) -> None:
        self._call(self._pay.close, out_trade_no=order_id)

    def refund(self, order_id: str, out_refund_no: str, refund_fen: int, total_fen: int, reason: str) -> dict:
        _, payload = self._call(self._pay.refund, out_refund_no=out_refund_no, out_trade_no=order_id,
                                amount={"refund": int(refund_fen), "total": int(total_fen), "currency": "CNY"},
                                reason=reason, notify_url=self._refund_notify_url)
        return payload

    def query_refund(self, out_refund_no: str) -> dict:
        _, payload = self._call(self._pay.query_refund, out_refund_no=out_refund_no)
        return payload

    # ------------------------------------------------------------------ incoming callbacks

    def parse_callback(self, headers: Mapping, body: bytes, now: float | None = None) -> Notification:
        lowered = {str(key).lower(): value for key, value in headers.items()}
        if not all(lowered.get(name) for name in CALLBACK_HEADERS):
            raise CallbackRejected("missing_headers", "Wechatpay-Timestamp/Nonce/Signature/Serial are required")
        if lowered["wechatpay-serial"] != self._public_key_id:
            raise CallbackRejected("unknown_serial", f"serial {lowered['wechatpay-serial']!r} is not ours")
        signature_type = lowered.get("wechatpay-signature-type")
        if signature_type and signature_type != SIGNATURE_TYPE:
            raise CallbackRejected("bad_signature", f"unsupported signature type {signature_type!r}")
        try:
            text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else str(body)
        except UnicodeDecodeError as error:
            raise CallbackRejected("bad_body", "body is not UTF-8") from error
        timestamp = lowered["wechatpay-timestamp"]
        if not rsa_verify(timestamp, lowered["wechatpay-nonce"], text, lowered["wechatpay-signature"],
                          self._public_key):
            raise CallbackRejected("bad_signature", "signature does not verify with the platform public key")
        # Checked after the signature so that only genuine but replayed/late messages are called stale.
        try:
            age = abs((time.time() if now is None else now) - int(timestamp))
        except ValueError as error:
            raise CallbackRejected("stale_timestamp", "timestamp is not an integer") from error
        if age > self._callback_max_age_s:
            raise CallbackRejected("stale_timestamp", f"signed {int(age)} s away from now")
        try:
            envelope = json.loads(text)
            resource = envelope["resource"]
            event_type, notification_id = envelope["event_type"], envelope["id"]
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise CallbackRejected("bad_body", "not a WeChat Pay notification envelope") from error
        if envelope.get("resource_type") != "encrypt-resource" or not isinstance(resource, dict) \
                or resource.get("algorithm") != "AEAD_AES_256_GCM":
            raise CallbackRejected("bad_body", "resource is not an AEAD_AES_256_GCM encrypted resource")
        if not all(isinstance(value, str) for value in (
                event_type, notification_id, resource.get("nonce"), resource.get("ciphertext"),
                resource.get("associated_data", ""))):
            raise CallbackRejected("bad_body", "id, event_type, resource.nonce, resource.ciphertext and "
                                               "resource.associated_data must be strings")
        try:
            plaintext = aes_decrypt(nonce=resource["nonce"], ciphertext=resource["ciphertext"],
                                    associated_data=resource.get("associated_data", ""), apiv3_key=self._apiv3_key)
        except ValueError as error:  # not base64, or a nonce AES-GCM cannot take
            raise CallbackRejected("bad_ciphertext", "resource cannot be decrypted") from error
        if plaintext is None:
            raise CallbackRejected("bad_ciphertext", "AES-GCM tag mismatch (wrong APIv3 key or tampered resource)")
        try:
            decrypted = json.loads(plaintext)
        except (ValueError, RecursionError) as error:
            raise CallbackRejected("bad_ciphertext", "decrypted resource is not JSON") from error
        if not isinstance(decrypted, dict):
            raise CallbackRejected("bad_ciphertext", "decrypted resource is not a JSON object")
        if decrypted.get("mchid", self._mchid) != self._mchid:
            raise CallbackRejected("mchid_mismatch", "resource is for another merchant", http_status=400)
        return Notification(id=str(notification_id), event_type=str(event_type),
                            create_time=str(envelope.get("create_time", "")), resource=decrypted)


def _json_or_empty(body) -> dict:
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if not body:
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}
