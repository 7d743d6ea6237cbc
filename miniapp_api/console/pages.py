"""Read-only pages: dashboard, order search, an order with everything that happened to it, a user."""
from __future__ import annotations

from flask import g, render_template, request

from portraits.billing import refunds
from miniapp_api.console import bp, metrics, present
from portraits import audit, identity
from miniapp_api.console.security import ConsoleRefusal, record, role_required, services

REFUNDABLE_STATES = ("paid", "fulfilled")
SEARCH_LIMIT = 50


@bp.get("/")
@role_required("viewer")
def dashboard():
    return render_template("console/dashboard.html", data=metrics.dashboard(services()))


@bp.get("/orders")
@role_required("viewer")
def orders():
    query = request.args.get("q", "").strip()
    found = []
    if query:
        found = list(services().db.orders.find(
            {"$or": [{"_id": query}, {"transaction_id": query}, {"user_id": query},
                     {"refunds.out_refund_no": query}]}).sort("created_at", -1).limit(SEARCH_LIMIT))
        record("search_orders", details={"query": query, "found": len(found)})
    return render_template("console/orders.html", query=query, orders=[present.order_view(o) for o in found])


@bp.get("/orders/<order_id>")
@role_required("viewer")
def order(order_id):
    svc = services()
    doc = _order_or_404(order_id)
    record("view_order", target={"order_id": order_id, "user_id": doc["user_id"]})
    avatar = svc.db.avatars.find_one({"_id": doc.get("avatar_id")})
    renders = svc.db.renders.find({"order_id": order_id}).sort("created_at", 1)
    alerts = list(svc.db.payment_alerts.find({"order_id": order_id}, {"kind": 1, "source": 1, "first_at": 1, "last_at": 1,
                                                                     "seen": 1}).sort("first_at", 1))
    entries = audit.recent(svc.db, target_id=order_id, limit=50) if g.operator["role"] == "admin" else None
    return render_template("console/order.html", order=present.order_view(doc), refundable=refundable(doc),
                           can_refund=doc["state"] in REFUNDABLE_STATES and refundable(doc) > 0,
                           avatar=present.avatar_view(svc, avatar),
                           renders=[present.render_view(svc, r) for r in renders], alerts=alerts, audit=entries)


@bp.get("/users/<user_id>")
@role_required("viewer")
def user(user_id):
    svc = services()
    doc = svc.db.users.find_one({"_id": user_id})
    if doc is None:
        raise ConsoleRefusal(404, "user_not_found", "没有这个用户 (no such user)")
    record("view_user", target={"user_id": user_id})
    orders_of_user = svc.db.orders.find({"user_id": user_id}).sort("created_at", -1).limit(100)
    avatars = svc.db.avatars.find({"user_id": user_id}).sort("created_at", -1).limit(50)
    renders = svc.db.renders.find({"user_id": user_id}).sort("created_at", -1).limit(100)
    return render_template("console/user.html", user=present.user_view(doc, identity.phone_of(svc, doc)),
                           orders=[present.order_view(o) for o in orders_of_user],
                           avatars=[present.avatar_view(svc, a) for a in avatars],
                           renders=[present.render_view(svc, r) for r in renders])


def _order_or_404(order_id: str) -> dict:
    doc = services().db.orders.find_one({"_id": order_id})
    if doc is None:
        raise ConsoleRefusal(404, "order_not_found", "没有这个订单 (no such order)")
    return doc


def refundable(order: dict) -> int:
    return refunds.refundable_amount(order)
