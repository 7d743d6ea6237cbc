"""Virtual payment's message pushes, applied through the functions every rail shares (payments.apply_payment,
refunds.apply_refund_result), so a push seen twice, redelivered, or beaten by reconciliation changes nothing more.

Handlers take the decrypted push (a dict) and return what happened (a stable word); they raise PushNotApplied
(or payments.PaymentMismatch, locks.OrderBusy) when WeChat should be answered with a non-zero ErrCode, which makes
it push again later. The push endpoint dispatches to them through portraits.push_events.HANDLERS.
"""
from __future__ import annotations

from portraits.billing import payments, rails, refunds

GOODS_DELIVER_EVENT = "xpay_goods_deliver_notify"
REFUND_EVENT = "xpay_refund_notify"


class PushNotApplied(ValueError):
    """A push we did not apply: `code` names why (bad_push, unknown_order, unknown_refund)."""

    def __init__(self, code: str, details: dict | None = None):
        super().__init__(code)
        self.code = code
        self.details = details or {}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def on_goods_deliver_notify(services, event: dict) -> str:
    """xpay_goods_deliver_notify: the user paid; the order becomes paid (its training starts) once."""
    pay_info, goods = event.get("WeChatPayInfo"), event.get("GoodsInfo")
    pay_info = pay_info if isinstance(pay_info, dict) else {}
    goods = goods if isinstance(goods, dict) else {}
    bad = [name for name, ok in (
        ("OutTradeNo", isinstance(event.get("OutTradeNo"), str)), ("OpenId", isinstance(event.get("OpenId"), str)),
        ("Env", _int(event.get("Env"))), ("GoodsInfo.ProductId", isinstance(goods.get("ProductId"), str)),
        ("GoodsInfo.Quantity", goods.get("Quantity") == 1), ("GoodsInfo.ActualPrice", _int(goods.get("ActualPrice"))),
    ) if not ok]
    if bad:
        raise PushNotApplied("bad_push", {"fields": bad})
    transaction = {"rail": rails.XPAY, "out_trade_no": event["OutTradeNo"], "trade_state": "SUCCESS",
                   "transaction_id": pay_info.get("TransactionId") or pay_info.get("MchOrderNo"),
                   "env": event["Env"], "amount": {"total": goods["ActualPrice"]},
                   "payer": {"openid": event["OpenId"]}, "product_id": goods["ProductId"]}
    order = payments.apply_payment(services, transaction, source=f"xpay-push:{event['OutTradeNo']}")
    if order is None:
        raise PushNotApplied("unknown_order", {"out_trade_no": event["OutTradeNo"]})
    return "applied"


def on_refund_notify(services, event: dict) -> str:
    """xpay_refund_notify: a refund we asked for ended (RetCode 0: refunded; otherwise it failed)."""
    refund_no, ret_code = event.get("MchRefundId"), event.get("RetCode")
    if not isinstance(refund_no, str) or not _int(ret_code):
        raise PushNotApplied("bad_push", {"fields": ["MchRefundId", "RetCode"]})
    owner = services.db.orders.find_one({"refunds.out_refund_no": refund_no}, {"rail": 1, "openid": 1})
    if owner is None or rails.rail_of(owner) != rails.XPAY or owner["openid"] != event.get("OpenId"):
        raise PushNotApplied("unknown_refund", {"out_refund_no": refund_no})
    succeeded = ret_code == 0
    result = {"out_refund_no": refund_no, "status": "SUCCESS" if succeeded else "ABNORMAL",
              "refund_id": event.get("WxRefundId"),
              "error": None if succeeded else f"xpay_refund_{ret_code}: {event.get('RetMsg', '')}"}
    refunds.apply_refund_result(services, result, source=f"xpay-refund-push:{refund_no}")
    return "applied"
