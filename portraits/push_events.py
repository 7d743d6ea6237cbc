"""The message-push events the service handles: event name -> handler(services, event: dict) -> outcome word.

MINIMAL (issue 14 part 5): only virtual payment's two events, so the part-5 tests run end to end. To be merged
with part 1's fuller table (media checks...), which keeps its own endpoint and registers these two handlers.
"""
from __future__ import annotations

from portraits.billing import xpay

PUSH_PATH = "/api/v1/wechat/push"

HANDLERS = {
    xpay.GOODS_DELIVER_EVENT: xpay.on_goods_deliver_notify,
    xpay.REFUND_EVENT: xpay.on_refund_notify,
}
