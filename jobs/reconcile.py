"""The periodic money tasks scheduled by jobs.periodic (see portraits.billing.reconcile for what they do)."""
from __future__ import annotations

from jobs import context
from portraits.billing import reconcile as billing_reconcile


def expire_orders() -> dict:
    return billing_reconcile.expire_unpaid_orders(context.services())


def reconcile() -> dict:
    return billing_reconcile.reconcile_with_gateway(context.services())
