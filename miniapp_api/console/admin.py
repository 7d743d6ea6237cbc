"""Admin pages: the audit log (read-only) and operator accounts."""
from __future__ import annotations

from flask import g, redirect, render_template, request, url_for

from miniapp_api.console import bp

from portraits import audit, operators as accounts
from miniapp_api.console.security import ConsoleRefusal, record, role_required, services


@bp.get("/audit")
@role_required("admin")
def audit_log():
    filters = {key: request.args.get(key, "").strip() for key in ("operator", "action", "target")}
    entries = audit.recent(services().db, operator=filters["operator"] or None, action=filters["action"] or None,
                           target_id=filters["target"] or None)
    return render_template("console/audit.html", entries=entries, filters=filters)


@bp.get("/operators")
@role_required("admin")
def operators():
    return render_template("console/operators.html", operators=accounts.all_operators(services().db),
                           roles=accounts.ROLES, error=None)


@bp.post("/operators")
@role_required("admin")
def operator_create():
    name = request.form.get("name", "").strip().lower()
    role = request.form.get("role", "")
    try:
        accounts.create(services().db, name, request.form.get("password", ""), role, by=f"operator:{g.operator['_id']}")
    except accounts.AccountError as error:
        record("operator_created", target={"operator": name}, details={"role": role, "code": error.code},
               outcome="refused")
        return render_template("console/operators.html", operators=accounts.all_operators(services().db),
                               roles=accounts.ROLES, error=error.message), 400
    record("operator_created", target={"operator": name}, details={"role": role})
    return redirect(url_for("console.operators"))


@bp.post("/operators/<name>")
@role_required("admin")
def operator_update(name):
    action = request.form.get("action", "")
    if name == g.operator["_id"] and action in ("disable", "role"):
        raise ConsoleRefusal(409, "cannot_change_self", "不能停用自己或修改自己的角色 (not on your own account)")
    changes = {"disable": {"disabled": True}, "enable": {"disabled": False},
               "role": {"role": request.form.get("role", "")}}.get(action)
    if changes is None:
        raise ConsoleRefusal(400, "invalid_action", "未知操作 (unknown action)")
    try:
        updated = accounts.update(services().db, name, **changes)
    except accounts.AccountError as error:
        raise ConsoleRefusal(400, error.code, error.message)
    if updated is None:
        raise ConsoleRefusal(404, "operator_not_found", "没有这个账号 (no such operator)")
    record(f"operator_{action}", target={"operator": name}, details=changes)
    return redirect(url_for("console.operators"))
