"""The subscribe-message task (see portraits.notifications for the rules)."""
from __future__ import annotations

from jobs import context
from portraits import notifications


def send_message(user_id: str, kind: str, data: dict) -> str:
    return notifications.send_message(context.services(), user_id, kind, data)
