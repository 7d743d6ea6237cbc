"""WeChat's virtual payment (xpay, 虚拟支付): the parameters of wx.requestVirtualPayment and the server APIs
`xpay/query_order` and `xpay/refund_order`.

Signatures, as WeChat documents them:
- paySig (client) = hex HMAC-SHA256(key=AppKey, msg="requestVirtualPayment&" + signData);
- signature (client) = hex HMAC-SHA256(key=the user's session_key, msg=signData);
- pay_sig (server APIs, a query parameter beside access_token) = hex HMAC-SHA256(key=AppKey, msg=uri + "&" + body),
  uri being the path alone ("/xpay/query_order", no query string) and body the exact bytes posted.
The AppKey is the one of the environment (`env` 0: production, 1: sandbox). Errors come as HTTP 200 with a
non-zero `errcode`; codes are mapped to the stable words the billing code already reads (order_not_exist,
resource_not_exists, orderpaid...).
"""
from __future__ import annotations

import hashlib
import hmac
import json

import requests

from portraits.gateways.wechat import DEFAULT_API_BASE_URL, WeChatUnavailable
from portraits.gateways.wechatpay import PaymentGatewayError

CLIENT_MODE = "short_series_goods"  # 道具直购: buying an item directly (not coins)
ERR_ORDER_NOT_EXIST = 268490002
ERR_PAY_SIG = 268490003
ERR_DUPLICATE = 268490004
ERR_LEFT_FEE = 268490008
ERR_REFUND_NOT_ALLOWED = 268490009
TOKEN_REJECTED = {40001, 40014, 42001}
ERROR_WORDS = {ERR_ORDER_NOT_EXIST: "order_not_exist", ERR_PAY_SIG: "pay_sig_invalid", ERR_DUPLICATE: "duplicate",
               ERR_LEFT_FEE: "left_fee_mismatch", ERR_REFUND_NOT_ALLOWED: "refund_not_allowed"}
# refund_order's refund_reason and req_from: "5" other reason, "3" other source (the service itself).
REFUND_REASON_OTHER = "5"
REQ_FROM_OTHER = "3"


def hmac_sha256_hex(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


class XPayGateway:
    def __init__(self, *, wechat, offer_id: str, app_key: str, env: int, api_base_url: str | None,
                 timeout: float = 10.0):
        self._wechat = wechat
        self.offer_id = offer_id
        self._app_key = app_key
        self.env = env
        self._base = (api_base_url or DEFAULT_API_BASE_URL).rstrip("/")
        self._timeout = timeout
        self._http = requests.Session()

    def client_params(self, *, order_id: str, product_id: str, price_fen: int, quantity: int, attach: str,
                      session_key: str) -> dict:
        """What wx.requestVirtualPayment takes: mode, signData (a JSON text, signed as it is), paySig, signature."""
        sign_data = json.dumps({"offerId": self.offer_id, "buyQuantity": quantity, "env": self.env,
                                "currencyType": "CNY", "productId": product_id, "goodsPrice": price_fen,
                                "outTradeNo": order_id, "attach": attach}, separators=(",", ":"), ensure_ascii=False)
        return {"mode": CLIENT_MODE, "signData": sign_data,
                "paySig": hmac_sha256_hex(self._app_key, "requestVirtualPayment&" + sign_data),
                "signature": hmac_sha256_hex(session_key, sign_data)}

    def query_order(self, openid: str, order_id: str) -> dict | None:
        """The payment or refund order `order_id` (our out_trade_no or refund number) as WeChat has it, or None."""
        try:
            return self._post("/xpay/query_order", {"openid": openid, "env": self.env, "order_id": order_id})["order"]
        except PaymentGatewayError as error:
            if error.code == "order_not_exist":
                return None
            raise

    def refund_order(self, *, openid: str, order_id: str, refund_order_id: str, left_fee: int,
                     refund_fee: int) -> dict:
        """Start a refund (it ends later: by xpay_refund_notify, or query_order on refund_order_id)."""
        return self._post("/xpay/refund_order", {
            "openid": openid, "order_id": order_id, "refund_order_id": refund_order_id, "left_fee": left_fee,
            "refund_fee": refund_fee, "biz_meta": "", "refund_reason": REFUND_REASON_OTHER,
            "req_from": REQ_FROM_OTHER, "env": self.env})

    def _post(self, uri: str, payload: dict) -> dict:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        try:
            token = self._wechat.access_token()
            answer = self._send(uri, body, token)
            if answer.get("errcode") in TOKEN_REJECTED:
                answer = self._send(uri, body, self._wechat.renew_access_token(token))
        except WeChatUnavailable as error:
            raise PaymentGatewayError("xpay_unreachable", str(error), retryable=True) from error
        errcode = answer.get("errcode", 0)
        if errcode == 0:
            return answer
        word = ERROR_WORDS.get(errcode, f"xpay_{errcode}")
        # -1 is WeChat's "system busy"; a token still refused after renewal is ours to wait out as well.
        retryable = errcode == -1 or errcode in TOKEN_REJECTED
        raise PaymentGatewayError(word, str(answer.get("errmsg", "")), retryable=retryable)

    def _send(self, uri: str, body: str, token: str) -> dict:
        try:
            response = self._http.post(self._base + uri, data=body.encode("utf-8"), timeout=self._timeout,
                                       params={"access_token": token,
                                               "pay_sig": hmac_sha256_hex(self._app_key, uri + "&" + body)},
                                       headers={"Content-Type": "application/json"})
        except requests.Timeout as error:
            raise PaymentGatewayError("xpay_timeout", str(error), retryable=True) from error
        except requests.RequestException as error:
            raise PaymentGatewayError("xpay_unreachable", type(error).__name__, retryable=True) from error
        if response.status_code >= 500:
            raise PaymentGatewayError(f"http_{response.status_code}", retryable=True,
                                      http_status=response.status_code)
        try:
            answer = response.json()
        except ValueError as error:
            raise PaymentGatewayError("xpay_bad_response", "answer is not JSON", retryable=True) from error
        if not isinstance(answer, dict):
            raise PaymentGatewayError("xpay_bad_response", "answer is not a JSON object", retryable=True)
        return answer
