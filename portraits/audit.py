"""The operators' audit log: append-only by construction. This module only ever inserts and reads; nothing in the
console updates or deletes an entry (tests check that no code path or route does)."""
from __future__ import annotations

from portraits import states

COLLECTION = "operator_audit"


def ensure_indexes(db) -> None:
    db[COLLECTION].create_index([("at", -1)])
    db[COLLECTION].create_index("target.order_id", sparse=True)


def record(db, *, operator: str, role: str | None, action: str, ip: str | None, user_agent: str | None = None,
           target: dict | None = None, details: dict | None = None, outcome: str = "ok") -> None:
    db[COLLECTION].insert_one({"at": states.now(), "operator": operator, "role": role, "action": action,
                               "target": target or {}, "details": details or {}, "outcome": outcome,
                               "ip": ip, "user_agent": (user_agent or "")[:200]})


def recent(db, *, operator: str | None = None, action: str | None = None, target_id: str | None = None,
           limit: int = 200) -> list[dict]:
    query = {}
    if operator:
        query["operator"] = operator
    if action:
        query["action"] = action
    if target_id:
        query["$or"] = [{"target.order_id": target_id}, {"target.user_id": target_id},
                        {"target.render_id": target_id}, {"target.operator": target_id}]
    return list(db[COLLECTION].find(query).sort("at", -1).limit(limit))
