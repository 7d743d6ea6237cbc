"""Subscribe messages through WeChat. Sending never blocks or fails the GPU job: it is a job of its own."""
from __future__ import annotations

from rq import Retry

from jobs import context, queues
from miniapp_api.wechat import SubscribeRefused, WeChatUnavailable

MESSAGES = {
    "training_started": ("pages/avatar/index", "数字分身开始训练"),
    "avatar_ready": ("pages/avatar/index", "数字分身已生成"),
    "portraits_ready": ("pages/render/index", "写真已生成"),
    "refund_made": ("pages/order/index", "退款已原路退回"),
}


def notify(services, user_id: str, kind: str, data: dict) -> None:
    template_id = services.settings.subscribe_templates.get(kind)
    if not template_id:
        return
    queues.queue(services, queues.DEFAULT).enqueue(
        send_message, user_id, kind, data, retry=Retry(max=3, interval=[10, 60, 300]), result_ttl=3600)


def send_message(user_id: str, kind: str, data: dict) -> str:
    services = context.services()
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
