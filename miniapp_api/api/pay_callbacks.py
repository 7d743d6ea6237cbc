"""WeChat Pay v3 callbacks: verified, decrypted, checked against our order, applied idempotently.

WeChat Pay reads any 2xx as delivered and retries anything else for 24 hours, so a failure to apply answers 5xx
and a callback we will never accept answers 4xx with its reason. A rejected callback changes no order (a genuine
but mismatching payment leaves an alert in payment_alerts for operators).
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from pymongo.errors import DuplicateKeyError

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.errors import error_detail
from miniapp_api.schemas import PayCallbackError, PayNotification
from portraits import metrics, states
from portraits.billing import payments, refunds
from portraits.billing.locks import OrderBusy
from portraits.gateways.wechatpay import CallbackRejected

bp = Blueprint("pay_callbacks", __name__, url_prefix="/api/v1/pay")
CALLBACK_KINDS = {"pay_callbacks.payment_notify": "payment", "pay_callbacks.refund_notify": "refund"}


def _counted(outcome: str) -> None:
    metrics.PAYMENT_CALLBACKS.labels(kind=CALLBACK_KINDS[request.endpoint], outcome=outcome).inc()


def _delivered(outcome: str):
    _counted(outcome)
    return "", 204


def _fail(status: int, code: str, message: str, details: dict | None = None):
    _counted(code)
    response = jsonify({"code": "FAIL", "message": message, "error": error_detail(code, message, details)})
    response.status_code = status
    return response


def _verified():
    try:
        return services().payments.parse_callback(request.headers, request.get_data()), None
    except CallbackRejected as rejected:
        return None, _fail(rejected.http_status, rejected.code, "callback rejected")


def _seen(notification) -> bool:
    return services().db.pay_notifications.find_one({"_id": notification.id, "applied": True}) is not None


def _record(notification, outcome: str) -> None:
    try:
        services().db.pay_notifications.insert_one({"_id": notification.id, "event_type": notification.event_type,
                                                    "applied": True, "outcome": outcome,
                                                    "received_at": states.now()})
    except DuplicateKeyError:
        pass


@bp.post("/notify")
@endpoint(ok={204: None}, errors=[400, 401, 404, 503], public=True, signed_body=PayNotification,
          error_model=PayCallbackError)
def payment_notify():
    """WeChat Pay v3 payment callback (signed, AES-256-GCM encrypted): 204 once applied, 5xx to be delivered again."""
    return _receive(lambda notification: payments.apply_payment(
        services(), notification.resource, source=f"notify:{notification.id}"),
        only_event="TRANSACTION.SUCCESS", unknown=("unknown_order", "no such order"))


@bp.post("/refund-notify")
@endpoint(ok={204: None}, errors=[400, 401, 404, 503], public=True, signed_body=PayNotification,
          error_model=PayCallbackError)
def refund_notify():
    """WeChat Pay v3 refund callback: 204 once applied, 5xx to be delivered again."""
    return _receive(lambda notification: refunds.apply_refund_result(
        services(), notification.resource, source=f"refund-notify:{notification.id}"),
        only_event=None, unknown=("unknown_refund", "no such refund"))


def _receive(apply, *, only_event: str | None, unknown: tuple[str, str]):
    """What both callbacks do: verify, skip what was applied before (or is not `only_event`), apply, record."""
    notification, failure = _verified()
    if failure:
        return failure
    if _seen(notification):
        return _delivered("duplicate")
    if only_event is not None and notification.event_type != only_event:
        _record(notification, "ignored")
        return _delivered("ignored")
    try:
        order = apply(notification)
    except payments.PaymentMismatch as mismatch:
        return _fail(400, mismatch.code, "transaction does not match the order",
                     {"fields": sorted(k for k, v in mismatch.details["expected"].items()
                                       if mismatch.details["observed"][k] != v)})
    except OrderBusy:
        return _fail(503, "order_busy", "order is being updated; deliver again later")
    if order is None:
        return _fail(404, *unknown)
    _record(notification, order["state"])
    return _delivered("applied")
