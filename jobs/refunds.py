"""Talking to WeChat Pay about refunds, retried with backoff while WeChat Pay is unreachable."""
from __future__ import annotations

from rq import Retry

from jobs import context, queues
from miniapp_api.payments import PaymentGatewayError

BACKOFF_S = [5, 30, 120, 600, 1800]


def enqueue_refund(services, order_id: str, out_refund_no: str) -> None:
    queues.enqueue(services, queues.DEFAULT, submit_refund, order_id, out_refund_no, job_id=f"refund-{out_refund_no}",
                   retry=Retry(max=len(BACKOFF_S), interval=BACKOFF_S))


def submit_refund(order_id: str, out_refund_no: str) -> str:
    from miniapp_api.billing import apply_refund_result

    services = context.services()
    order = services.db.orders.find_one({"_id": order_id})
    if order is None:
        return "gone"
    refund = next(r for r in order["refunds"] if r["out_refund_no"] == out_refund_no)
    if refund["state"] not in ("requested", "PROCESSING"):
        return refund["state"]
    try:
        result = services.payments.refund(order_id, out_refund_no, refund["amount"], order["amount"], refund["reason"])
    except PaymentGatewayError as error:
        if error.retryable:
            raise
        result = {"out_refund_no": out_refund_no, "status": "ABNORMAL", "error": error.code}
    apply_refund_result(services, {**result, "out_refund_no": out_refund_no}, source=f"refund-api:{out_refund_no}")
    return result.get("status", "unknown")
