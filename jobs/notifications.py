"""The subscribe-message task (see portraits.notifications for the rules)."""
from __future__ import annotations

from jobs import context
from portraits import notifications


def send_message(message_id: str) -> str:
    return notifications.send_message(context.services(), message_id)
