"""The content-check task: submits one medium to WeChat's mediaCheckAsync (see portraits.moderation for the rules).

Enqueued by portraits.content_checks.request_check as tasks.SUBMIT_CONTENT_CHECK, on the default queue, so an
upload or a render never waits on WeChat.
"""
from __future__ import annotations

from jobs import context
from portraits import moderation


def submit_content_check(check_id: str) -> str:
    return moderation.submit(context.services(), check_id)
