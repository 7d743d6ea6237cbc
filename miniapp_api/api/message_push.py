"""The mini-program's message-push endpoint (WeChat allows one push URL per mini-program).

MINIMAL (issue 14 part 5): plaintext JSON mode only, dispatching to portraits.push_events.HANDLERS, so virtual
payment's pushes run end to end in tests. To be merged with part 1's fuller endpoint (AES safe mode, XML, media
check verdicts), which keeps its own receiver and registers the xpay handlers.

Every request carries signature = SHA-1 of (Token, timestamp, nonce) sorted and joined, in the query string; one
that does not verify, or is older than CALLBACK_MAX_AGE_S, is refused 401 and changes nothing. A verified push is
answered {"ErrCode": 0, "ErrMsg": "success"} once applied (or when it is an event we do not handle); a push we
could not apply is answered with a non-zero ErrCode and its reason, and WeChat pushes it again later.
"""
from __future__ import annotations

import json
import time

from flask import Blueprint, Response, request
from pydantic import ValidationError
from wechatpy.exceptions import InvalidSignatureException
from wechatpy.utils import check_signature

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import refusal, services
from miniapp_api.errors import ApiError
from miniapp_api.schemas import PushEvent, PushQuery, PushReply
from portraits.billing import payments
from portraits.billing.locks import OrderBusy
from portraits.billing.xpay import PushNotApplied
from portraits.push_events import HANDLERS, PUSH_PATH

bp = Blueprint("message_push", __name__, url_prefix=PUSH_PATH)
NOT_APPLIED = 1


def _verified_query() -> PushQuery:
    """The signed query string (signature, timestamp, nonce[, echostr]), checked. Read here rather than declared
    to the contract: spectree does not hand query models to routes whose body or answer it does not validate."""
    try:
        query = PushQuery.model_validate(request.args.to_dict())
    except ValidationError as error:
        raise refusal(error, PushQuery, request.args.to_dict())
    settings = services().settings
    try:
        check_signature(settings.wechat_push_token, query.signature, query.timestamp, query.nonce)
    except InvalidSignatureException:
        raise ApiError(401, "bad_signature", "The push signature does not verify with our Token.")
    try:
        age = abs(time.time() - int(query.timestamp))
    except ValueError:
        raise ApiError(401, "stale_timestamp", "The timestamp is not an integer.")
    if age > settings.callback_max_age_s:
        raise ApiError(401, "stale_timestamp", f"Signed {int(age)} s away from now.")
    return query


@bp.get("")
@endpoint(ok={200: "text/plain"}, errors=[400, 401], public=True)
def verify_url():
    """WeChat's URL verification (query: signature, timestamp, nonce, echostr): echostr back when the signature
    is ours."""
    query = _verified_query()
    return Response(query.echostr or "", content_type="text/plain")


@bp.post("")
@endpoint(ok={200: PushReply}, errors=[400, 401], public=True, signed_body=PushEvent)
def receive():
    """A message push (plaintext JSON; query: signature, timestamp, nonce): ErrCode 0 once applied, non-zero to
    be pushed again."""
    _verified_query()
    try:
        event = json.loads(request.get_data(as_text=True))
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ApiError(400, "push_not_json", "Only plaintext JSON pushes are taken here.")
    handler = HANDLERS.get(event.get("Event"))
    if handler is None:
        return {"ErrCode": 0, "ErrMsg": "success"}
    try:
        handler(services(), event)
    except PushNotApplied as refused:
        return {"ErrCode": NOT_APPLIED, "ErrMsg": refused.code}
    except payments.PaymentMismatch as mismatch:
        return {"ErrCode": NOT_APPLIED, "ErrMsg": mismatch.code}
    except OrderBusy:
        return {"ErrCode": NOT_APPLIED, "ErrMsg": "order_busy"}
    return {"ErrCode": 0, "ErrMsg": "success"}
