"""The mini-program's message push (消息推送): WeChat's GET check of the URL and its POSTed events, verified by
portraits.gateways.wechat_push and dispatched by event name (portraits.push_events).

WeChat reads `success` (HTTP 200) as delivered and pushes again, a few times, otherwise: a push we fail to handle
answers 5xx; one we will never accept answers 4xx with its reason code and changes nothing. Virtual payment's pushes
(xpay_goods_deliver_notify, xpay_refund_notify) are answered as it expects instead: {"ErrCode": 0, "ErrMsg":
"success"} once applied, and a non-zero ErrCode with the reason when it should push again.
"""
from __future__ import annotations

from flask import Blueprint, Response, request

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.errors import ApiError
from miniapp_api.schemas import TEXT, PushReply, WeChatPush
from portraits import metrics, push_events
from portraits.gateways.wechat_push import PushRejected, PushVerifier, first_delivery

bp = Blueprint("message_push", __name__, url_prefix=push_events.PUSH_PATH)


def verifier() -> PushVerifier:
    settings = services().settings
    return PushVerifier(token=settings.wechat_push_token, aes_key=settings.wechat_push_aes_key,
                        appid=settings.wechat_appid, mode=settings.wechat_push_mode,
                        max_age_s=settings.callback_max_age_s)


def _refused(rejected: PushRejected, event: str = "unknown") -> ApiError:
    metrics.WECHAT_PUSHES.labels(event=event, outcome=rejected.code).inc()
    return ApiError(rejected.status, rejected.code, rejected.message)


@bp.get("")
@endpoint(ok={200: TEXT}, errors=[403], public=True)
def verify_push_url():
    """WeChat's check of the message-push URL (signature, timestamp, nonce, echostr): echostr back when the
    signature is made with our Token, else 403 push_signature_invalid or push_expired."""
    try:
        echostr = verifier().verify_url(request.args)
    except PushRejected as rejected:
        raise _refused(rejected) from None
    return Response(echostr, mimetype=TEXT)


@bp.post("")
@endpoint(ok={200: PushReply}, also_answers={200: TEXT}, errors=[400, 403, 503], public=True,
          signed_body=WeChatPush,
          also_accepts={"text/xml": "the same push in WeChat's XML (<xml><ToUserName>…</ToUserName>…</xml>)"})
def receive_push():
    """A message push (plaintext or safe mode, JSON or XML): `success` (text/plain) once handled; for virtual
    payment's events the JSON {"ErrCode": 0, "ErrMsg": "success"} once applied, a non-zero ErrCode with the reason
    to be pushed again; 4xx with the reason when it cannot be trusted (nothing changes); 5xx to be pushed again."""
    svc = services()
    try:
        message = verifier().parse(request.args, request.get_data())
        event = str(message.get("Event") or "none")
        with first_delivery(svc.redis, request.args, svc.settings.callback_max_age_s):
            outcome = push_events.handle(svc, message)
    except PushRejected as rejected:
        raise _refused(rejected) from None
    except push_events.PUSH_AGAIN as refused:
        outcome = push_events.push_again_reason(refused)
        metrics.WECHAT_PUSHES.labels(event=event, outcome=outcome).inc()
        return {"ErrCode": push_events.NOT_APPLIED, "ErrMsg": outcome}
    metrics.WECHAT_PUSHES.labels(event=event if event in push_events.HANDLERS else "other", outcome=outcome).inc()
    if event in push_events.JSON_ANSWERED:
        return {"ErrCode": 0, "ErrMsg": "success"}
    return Response("success", mimetype=TEXT)
