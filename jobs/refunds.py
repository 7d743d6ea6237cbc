"""The refund task: asks WeChat Pay for one requested refund (see portraits.billing.refunds for the rules).

Enqueued by portraits.billing.refunds.enqueue_refund as tasks.SUBMIT_REFUND, with its retries and backoff.
"""
from __future__ import annotations

from jobs import context
from portraits.billing import refunds


def submit_refund(order_id: str, out_refund_no: str) -> str:
    return refunds.submit(context.services(), order_id, out_refund_no)
