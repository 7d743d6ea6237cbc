"""What each message-push event (消息推送) WeChat sends means to us, by its `Event` name.

miniapp_api.api.message_push verifies a push (signature, timestamp, replay; safe mode: msg_signature, decryption,
appid) and hands its message, a dict as WeChat wrote it, to the handler named here; an event with no handler is
acknowledged and ignored. A handler returns a short word for the log and metrics, and must be idempotent: WeChat
pushes an event again when the answer is late. One line per event:
"""
from __future__ import annotations

from portraits import moderation

HANDLERS = {
    "wxa_media_check": moderation.receive_media_check,
}


def handle(services, message: dict) -> str:
    handler = HANDLERS.get(message.get("Event"))
    if handler is None:
        return "ignored"
    return handler(services, message)
