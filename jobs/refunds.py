"""Talking to WeChat Pay about refunds, retried with backoff while WeChat Pay is unreachable or answers 5xx.

The refund number is fixed when the refund is requested, so every retry (and the reconciliation job, which picks up
refunds whose job was lost) asks for the same refund: WeChat Pay answers a repeated number with the refund it has.
"""
from __future__ import annotations

from rq import Retry

from jobs import context, queues
from miniapp_api.payments import PaymentGatewayError


def enqueue_refund(services, order_id: str, out_refund_no: str) -> None:
    backoff = list(services.settings.refund_backoff_s)
    queues.enqueue(services, queues.DEFAULT, submit_refund, order_id, out_refund_no, job_id=f"refund-{out_refund_no}",
                   retry=Retry(max=len(backoff), interval=backoff) if backoff else None)


def submit_refund(order_id: str, out_refund_no: str) -> str:
    return submit(context.services(), order_id, out_refund_no)


def submit(services, order_id: str, out_refund_no: str) -> str:
    """Ask WeChat Pay for one requested refund and apply its answer. Raises PaymentGatewayError when the answer
    should be waited for (retryable), leaving the refund `requested`."""
    from miniapp_api.billing import REFUND_PENDING, REFUND_REJECTED, apply_refund_result

    order = services.db.orders.find_one({"_id": order_id})
    refund = next((r for r in (order or {}).get("refunds", []) if r["out_refund_no"] == out_refund_no), None)
    if refund is None:
        return "gone"
    if refund["state"] not in REFUND_PENDING:
        return refund["state"]
    try:
        result = services.payments.refund(order_id, out_refund_no, refund["amount"], order["amount"], refund["reason"])
    except PaymentGatewayError as error:
        if error.retryable:
            services.db.orders.update_one({"_id": order_id, "refunds.out_refund_no": out_refund_no},
                                          {"$set": {"refunds.$.last_error": error.code}})
            raise
        # Refused outright, but an unreadable answer may hide an accepted refund: believe only WeChat Pay's record.
        try:
            result = services.payments.query_refund(out_refund_no)
        except PaymentGatewayError as query_error:
            if query_error.code != "resource_not_exists":
                raise
            result = {"status": REFUND_REJECTED, "error": error.code}
    apply_refund_result(services, {**result, "out_refund_no": out_refund_no}, source=f"refund-api:{out_refund_no}")
    return str(result.get("status", "unknown"))
