"""Money and job actions: refunds (full or partial, reviewed then confirmed), retrying a failed render or refund.

Retry semantics, kept inside states.MACHINES (failed renders and avatars never move again):
- a failed render is redone as a new render of the same template on the same avatar (`retry_of` links them); a
  charged render takes back the credit its failure returned, so the user gets the set they paid for, once;
- a failed training has already asked for the refund of its order, so the console offers no retry for it;
- an order whose refund finally failed (`refund_failed`) can ask WeChat Pay again for the same amount.
"""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from flask import g, redirect, render_template, request, url_for

from portraits.billing import refunds
from portraits import renders
from portraits.errors import DomainError
from miniapp_api.console import bp
from miniapp_api.console.pages import REFUNDABLE_STATES, _order_or_404, refundable
from miniapp_api.console.security import ConsoleRefusal, record, role_required, services

MAX_REASON_LENGTH = 200


@bp.get("/orders/<order_id>/refund")
@role_required("support")
def refund_form(order_id):
    order = _order_or_404(order_id)
    _check_refundable_state(order)
    return render_template("console/refund_form.html", order=order, refundable=refundable(order), error=None,
                           form={"mode": "full", "amount": "", "reason": ""})


@bp.post("/orders/<order_id>/refund/review")
@role_required("support")
def refund_review(order_id):
    order = _order_or_404(order_id)
    _check_refundable_state(order)
    form = {"mode": request.form.get("mode", "full"), "amount": request.form.get("amount", "").strip(),
            "reason": request.form.get("reason", "").strip()}
    try:
        amount, reason = _checked_request(order, form["mode"], form["amount"], form["reason"])
    except ConsoleRefusal as refusal:
        return render_template("console/refund_form.html", order=order, refundable=refundable(order),
                               error=refusal, form=form), refusal.status
    return render_template("console/refund_confirm.html", order=order, amount=amount, reason=reason,
                           refundable=refundable(order))


@bp.post("/orders/<order_id>/refund")
@role_required("support")
def refund_execute(order_id):
    order = _order_or_404(order_id)
    if request.form.get("confirmed") != "yes":
        return redirect(url_for("console.refund_form", order_id=order_id))
    _check_refundable_state(order)
    try:
        amount = int(request.form.get("amount_fen", ""))
    except ValueError:
        raise ConsoleRefusal(400, "invalid_amount", "金额无效 (invalid amount)")
    amount, reason = _checked_amount(order, amount), _checked_reason(request.form.get("reason", ""))
    operator = g.operator["_id"]
    try:
        moved = refunds.request_refund(services(), order_id, reason, by=f"operator:{operator}",
                                       expect=set(REFUNDABLE_STATES), amount=amount)
    except refunds.RefundRefused as refused:
        record("refund_requested", target={"order_id": order_id, "user_id": order["user_id"]},
               details={"amount": amount, "reason": reason, "code": refused.code}, outcome="refused")
        raise ConsoleRefusal(409, refused.code, "可退余额已变化，未发起退款，请刷新后重试 (what is left changed; nothing refunded)")
    if moved is None:
        record("refund_requested", target={"order_id": order_id, "user_id": order["user_id"]},
               details={"amount": amount, "reason": reason}, outcome="lost_race")
        raise ConsoleRefusal(409, "refund_not_possible", "订单状态已变化，未发起退款，请刷新后查看 (order changed; nothing refunded)")
    out_refund_no = moved["refunds"][-1]["out_refund_no"]
    record("refund_requested", target={"order_id": order_id, "user_id": order["user_id"]},
           details={"amount": amount, "reason": reason, "out_refund_no": out_refund_no})
    return redirect(url_for("console.order", order_id=order_id, done="refund"))


@bp.post("/orders/<order_id>/refund/retry")
@role_required("support")
def refund_retry(order_id):
    order = _order_or_404(order_id)
    failed = [r for r in order.get("refunds", []) if r["state"] in refunds.REFUND_FINAL_FAILURES]
    if order["state"] != "refund_failed" or not failed:
        raise ConsoleRefusal(409, "no_failed_refund", "该订单没有失败的退款 (no failed refund to retry)")
    amount = _checked_amount(order, failed[-1]["amount"])
    reason = _checked_reason(request.form.get("reason") or f"retry of {failed[-1]['out_refund_no']}")
    try:
        moved = refunds.request_refund(services(), order_id, reason, by=f"operator:{g.operator['_id']}",
                                       expect={"refund_failed"}, amount=amount)
    except refunds.RefundRefused as refused:
        raise ConsoleRefusal(409, refused.code, "可退余额已变化，未发起退款 (what is left changed; nothing refunded)")
    record("refund_retried", target={"order_id": order_id, "user_id": order["user_id"]},
           details={"amount": amount, "reason": reason, "after": failed[-1]["out_refund_no"]},
           outcome="ok" if moved else "lost_race")
    if moved is None:
        raise ConsoleRefusal(409, "refund_not_possible", "订单状态已变化，未发起退款 (order changed; nothing refunded)")
    return redirect(url_for("console.order", order_id=order_id, done="refund"))


RETRY_REFUSALS = {
    "render_not_retryable": "只有失败且未重试过的出图可以重试 (only a failed render, once)",
    "avatar_not_trained": "数字分身不可用 (the avatar is not trained)",
    "no_render_credits": "订单没有可用的出图次数或已退款 (no credit left on the order)",
}


@bp.post("/renders/<render_id>/retry")
@role_required("support")
def render_retry(render_id):
    svc = services()
    render = svc.db.renders.find_one({"_id": render_id})
    if render is None:
        raise ConsoleRefusal(404, "render_not_found", "没有这个出图任务 (no such render)")
    target = {"render_id": render_id, "order_id": render["order_id"], "user_id": render["user_id"]}
    try:
        retried = renders.retry_failed_render(svc, render, by=f"operator:{g.operator['_id']}")
    except DomainError as error:
        record("render_retried", target=target, details={"code": error.code}, outcome="refused")
        raise ConsoleRefusal(409, error.code, RETRY_REFUSALS[error.code])
    record("render_retried", target=target, details={"new_render_id": retried["_id"]})
    return redirect(url_for("console.order", order_id=render["order_id"], done="retry"))


def _check_refundable_state(order: dict) -> None:
    if order["state"] not in REFUNDABLE_STATES or refundable(order) <= 0:
        raise ConsoleRefusal(409, "order_not_refundable",
                             f"订单状态为 {order['state']}，不能发起退款 (order is {order['state']}; nothing to refund)")


def _checked_request(order: dict, mode: str, amount_text: str, reason: str) -> tuple[int, str]:
    if mode == "full":
        amount = refundable(order)
    elif mode == "partial":
        amount = _fen_from_yuan(amount_text)
    else:
        raise ConsoleRefusal(400, "invalid_mode", "请选择全额或部分退款 (choose full or partial)")
    return _checked_amount(order, amount), _checked_reason(reason)


def _checked_amount(order: dict, amount: int) -> int:
    left = refundable(order)
    if amount <= 0:
        raise ConsoleRefusal(400, "invalid_amount", "退款金额必须大于 0 (amount must be positive)")
    if amount > left:
        raise ConsoleRefusal(409, "amount_above_remaining",
                             f"退款金额超过可退余额 ¥{left / 100:.2f} (more than what is left)")
    operator = g.operator
    if operator["role"] != "admin":
        limit = services().settings.support_refund_limit_fen
        # Counted per order, so a support account cannot pass its limit by splitting a refund into parts.
        by_operators = sum(r["amount"] for r in order.get("refunds", [])
                           if str(r.get("requested_by", "")).startswith("operator:")
                           and r["state"] not in refunds.REFUND_FINAL_FAILURES)
        if amount + by_operators > limit:
            record("refund_denied", target={"order_id": order["_id"], "user_id": order["user_id"]},
                   details={"amount": amount, "limit": limit, "already": by_operators}, outcome="refused")
            raise ConsoleRefusal(403, "above_support_limit",
                                 f"客服退款上限为每单 ¥{limit / 100:.2f}，请联系管理员 (above the support limit; ask an admin)")
    return amount


def _checked_reason(reason: str) -> str:
    reason = " ".join((reason or "").split())
    if not reason:
        raise ConsoleRefusal(400, "reason_required", "请填写退款原因 (a reason is required)")
    return reason[:MAX_REASON_LENGTH]


def _fen_from_yuan(text: str) -> int:
    try:
        value = Decimal(text)
        exact = value.is_finite() and value == value.quantize(Decimal("0.01"))
    except InvalidOperation:
        exact = False
    if not exact:
        raise ConsoleRefusal(400, "invalid_amount", "金额以元为单位，最多两位小数，如 4.90 (amount in yuan, e.g. 4.90)")
    return int(value * 100)
