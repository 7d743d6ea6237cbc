"""What each message-push event (消息推送) WeChat sends means to us, by its `Event` name.

miniapp_api.api.message_push verifies a push (signature, timestamp, replay; safe mode: msg_signature, decryption,
appid) and hands its message, a dict as WeChat wrote it, to the handler named here; an event with no handler is
acknowledged and ignored. A handler returns a short word for the log and metrics, and must be idempotent: WeChat
pushes an event again when the answer is late. One line per event:
"""
from __future__ import annotations

from portraits import moderation
from portraits.billing import payments, xpay
from portraits.billing.locks import OrderBusy

HANDLERS = {
    "wxa_media_check": moderation.receive_media_check,
    xpay.GOODS_DELIVER_EVENT: xpay.on_goods_deliver_notify,
    xpay.REFUND_EVENT: xpay.on_refund_notify,
}
# Answered as virtual payment expects: {"ErrCode": 0, "ErrMsg": "success"} once applied; every other event `success`.
JSON_ANSWERED = {xpay.GOODS_DELIVER_EVENT, xpay.REFUND_EVENT}
# What a handler raises when WeChat should push the event again (answered ErrCode NOT_APPLIED and the reason).
PUSH_AGAIN = (xpay.PushNotApplied, payments.PaymentMismatch, OrderBusy)
NOT_APPLIED = 1
PUSH_PATH = "/api/v1/wechat/push"  # the message-push URL configured in WeChat's console, under PUBLIC_BASE_URL


def handle(services, message: dict) -> str:
    handler = HANDLERS.get(message.get("Event"))
    if handler is None:
        return "ignored"
    return handler(services, message)


def push_again_reason(refused: Exception) -> str:
    """The reason code answered with a push WeChat should send again (one of PUSH_AGAIN)."""
    return "order_busy" if isinstance(refused, OrderBusy) else refused.code
