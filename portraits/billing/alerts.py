"""Payment alerts: what operators must look at (a mismatching payment, a refund that failed for good)."""
from __future__ import annotations

from portraits import metrics, states


def alert(services, order_id: str, kind: str, key: str, source: str, details: dict | None = None) -> None:
    """Something operators must look at. One alert per (kind, order, key) however often it is seen again."""
    at = states.now()
    result = services.db.payment_alerts.update_one(
        {"_id": f"{kind}:{order_id}:{key}"},
        {"$setOnInsert": {"order_id": order_id, "kind": kind, "key": key, "source": source,
                          "details": details or {}, "first_at": at, "resolved": False},
         "$set": {"last_at": at}, "$inc": {"seen": 1}},
        upsert=True,
    )
    if result.upserted_id is not None:
        metrics.PAYMENT_ALERTS.labels(kind=kind).inc()
