"""The share-code task (see portraits.sharing for the rules)."""
from __future__ import annotations

from jobs import context
from portraits import sharing


def fetch_share_code(image_id: str) -> str:
    return sharing.fetch_owed(context.services(), image_id)
