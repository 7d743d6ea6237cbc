"""Payment rails: how an order's money moves. Each rail answers the same calls the billing code makes of WeChat Pay
(query_order, close_order, refund, query_refund), in WeChat Pay's vocabulary (trade_state, refund status, error
codes), so orders, payments, refunds and reconciliation stay one code path whatever the rail.

- `jsapi`: WeChat Pay JSAPI (services.payments).
- `xpay`: WeChat's virtual payment (services.xpay). It has no close call: an unpaid order is asked about and, when
  still unpaid, closed here only (a late payment is then refunded, or made good, as any paid-after-close one).
- `credit`: a free redo credit given as a make-good (portraits.billing.makegood); no money moves.

An order is on the rail it was created on (`order["rail"]`; orders from before rails existed are `jsapi`).
"""
from __future__ import annotations

from portraits.gateways.wechatpay import PaymentGatewayError

JSAPI, XPAY, CREDIT = "jsapi", "xpay", "credit"
IOS = "ios"
# query_order's status -> WeChat Pay's trade_state: 2 paid, 3 delivering, 4 delivered, 7 a refund of it failed (the
# money is still ours); 5 and 8 refunded; 6 closed; 0 and 1 not paid.
XPAY_TRADE_STATES = {0: "NOTPAY", 1: "NOTPAY", 2: "SUCCESS", 3: "SUCCESS", 4: "SUCCESS", 5: "REFUND", 6: "CLOSED",
                     7: "SUCCESS", 8: "REFUND"}
# A refund order's status -> WeChat Pay's refund status.
XPAY_REFUND_STATUSES = {1: "PROCESSING", 5: "SUCCESS", 8: "SUCCESS", 7: "ABNORMAL"}
ENV_OF_ENV_TYPE = {1: 0, 2: 1}  # query_order's env_type (1 production, 2 sandbox) -> the request's env


def rail_for(settings, platform: str | None) -> str:
    if settings.payment_rail == "by_platform":
        return XPAY if (platform or "").lower() in settings.xpay_platforms else JSAPI
    return settings.payment_rail


def rail_of(order: dict) -> str:
    return order.get("rail", JSAPI)


def refund_impossible(order: dict) -> bool:
    """Money the developer cannot send back: iOS virtual payments (Apple decides) and free redo credits."""
    return rail_of(order) == CREDIT or (rail_of(order) == XPAY and order.get("platform") == IOS)


def gateway_for(services, order: dict):
    rail = rail_of(order)
    if rail == XPAY:
        return XPayRail(services, order)
    if rail == CREDIT:
        return CreditRail(services, order)
    return services.payments


def gateway_of(services, order_id: str):
    return gateway_for(services, services.db.orders.find_one({"_id": order_id}) or {"_id": order_id})


def xpay_transaction(order_id: str, raw: dict) -> dict:
    """A query_order answer as a transaction payments.apply_payment reads. It names neither the payer (it was
    asked for the order's openid) nor the product, so only the rail, the environment and the amount are checked."""
    return {"rail": XPAY, "out_trade_no": order_id, "trade_state": XPAY_TRADE_STATES.get(raw.get("status"), "NOTPAY"),
            "transaction_id": raw.get("wxpay_order_id") or raw.get("wx_order_id"),
            "env": ENV_OF_ENV_TYPE.get(raw.get("env_type")), "amount": {"total": raw.get("paid_fee")}}


class XPayRail:
    def __init__(self, services, order: dict):
        self._xpay = services.xpay
        self._order = order

    def query_order(self, order_id: str) -> dict | None:
        raw = self._xpay.query_order(self._order["openid"], order_id)
        return None if raw is None else xpay_transaction(order_id, raw)

    def close_order(self, order_id: str) -> None:
        transaction = self.query_order(order_id)
        if transaction is not None and transaction["trade_state"] in ("SUCCESS", "REFUND"):
            raise PaymentGatewayError("orderpaid", "paid through virtual payment", retryable=False)

    def refund(self, order_id: str, out_refund_no: str, refund_fen: int, total_fen: int, reason: str) -> dict:
        raw = self._xpay.query_order(self._order["openid"], order_id)
        if raw is None:
            raise PaymentGatewayError("order_not_exist", "virtual payment has no such order", retryable=False)
        try:
            answer = self._xpay.refund_order(openid=self._order["openid"], order_id=order_id,
                                             refund_order_id=out_refund_no, left_fee=raw["left_fee"],
                                             refund_fee=refund_fen)
        except PaymentGatewayError as error:
            if error.code != "duplicate":
                raise
            return self.query_refund(out_refund_no)  # asked before (a retried job): its refund is the answer
        return {"status": "PROCESSING", "refund_id": answer.get("refund_wx_order_id")}

    def query_refund(self, out_refund_no: str) -> dict:
        raw = self._xpay.query_order(self._order["openid"], out_refund_no)
        if raw is None:
            raise PaymentGatewayError("resource_not_exists", "virtual payment has no such refund", retryable=False)
        return {"status": XPAY_REFUND_STATUSES.get(raw.get("status"), "PROCESSING"), "refund_id": raw.get("wx_order_id")}


class CreditRail:
    """An order paid with a free redo credit: paid exactly when the user's credit names it as used."""

    def __init__(self, services, order: dict):
        self._db = services.db
        self._order = order

    def query_order(self, order_id: str) -> dict | None:
        used = self._db.users.find_one({"_id": self._order.get("user_id"), "make_good_credits.used_by": order_id},
                                       {"_id": 1})
        return credit_transaction(self._order, "SUCCESS" if used else "NOTPAY")

    def close_order(self, order_id: str) -> None:
        if self.query_order(order_id)["trade_state"] == "SUCCESS":
            raise PaymentGatewayError("orderpaid", "paid with a free redo credit", retryable=False)

    def refund(self, *_args) -> dict:
        raise PaymentGatewayError("refund_not_allowed", "a free redo credit is not money", retryable=False)

    def query_refund(self, out_refund_no: str) -> dict:
        raise PaymentGatewayError("resource_not_exists", "a free redo credit has no refunds", retryable=False)


def credit_transaction(order: dict, trade_state: str = "SUCCESS") -> dict:
    return {"rail": CREDIT, "out_trade_no": order["_id"], "trade_state": trade_state,
            "transaction_id": f"credit:{order['_id']}", "amount": {"total": order.get("amount")}}
