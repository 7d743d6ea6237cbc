"""Subscribe messages through WeChat. Sending never blocks or fails the GPU job: it is a job of its own.

One-time grants are counted per user and template (POST /api/v1/subscriptions) and one is consumed per message.
WeChat refusing (43101: no grant left on its side) zeroes our count; a transient error gives the grant back and the
job is retried with backoff.
"""
from __future__ import annotations

import logging

from portraits import tasks
from portraits.gateways.wechat import SubscribeRefused, WeChatUnavailable

MESSAGES = {
    "training_started": ("pages/avatar/index", "数字分身开始训练"),
    "avatar_ready": ("pages/avatar/index", "数字分身已生成"),
    "portraits_ready": ("pages/render/index", "写真已生成"),
    "refund_made": ("pages/order/index", "退款已原路退回"),
}


log = logging.getLogger(__name__)
RETRY_BACKOFF_S = [10, 60, 300]


def notify(services, user_id: str, kind: str, data: dict) -> None:
    """Queue a message; never raises, so a GPU job is not failed by the messaging side."""
    template_id = services.settings.subscribe_templates.get(kind)
    if not template_id:
        return
    try:
        tasks.enqueue_message(services, user_id, kind, data, RETRY_BACKOFF_S)
    except Exception:
        log.exception("could not queue the %s message for %s", kind, user_id)


def send_message(services, user_id: str, kind: str, data: dict) -> str:
    template_id = services.settings.subscribe_templates[kind]
    # Consume one one-time grant first; a grant is only ever used once even if sending is retried after a crash.
    user = services.db.users.find_one_and_update(
        {"_id": user_id, f"subscriptions.{template_id}": {"$gt": 0}},
        {"$inc": {f"subscriptions.{template_id}": -1}},
    )
    if user is None:
        return "no_grant"
    page, title = MESSAGES[kind]
    fields = {"thing1": {"value": title}, **{f"character_string{i + 2}": {"value": str(v)[:32]}
                                             for i, v in enumerate(data.values())}}
    try:
        services.wechat.send_subscribe_message(user["openid"], template_id, fields, page)
    except SubscribeRefused:
        services.db.users.update_one({"_id": user_id}, {"$set": {f"subscriptions.{template_id}": 0}})
        return "refused"
    except WeChatUnavailable:
        services.db.users.update_one({"_id": user_id}, {"$inc": {f"subscriptions.{template_id}": 1}})
        raise
    return "sent"
