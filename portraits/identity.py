"""Real identity (Deep Synthesis Provisions art. 9): a phone number bound through WeChat's getPhoneNumber button
before any face processing or payment (REQUIRE_PHONE).

The number is sealed with the user's data key like their photos (portraits.store.vault): MongoDB holds only the
ciphertext, the client sees it masked, the export shows it in full, and erasure shreds the key and deletes the user
document that holds it. Withdrawing face consent keeps the account and so its phone: the number is sealed again
under the user's new key (portraits.privacy.withdraw_face_consent).
"""
from __future__ import annotations

import json

from cryptography.exceptions import InvalidTag

from portraits import states
from portraits.errors import Forbidden, Invalid, Unavailable
from portraits.gateways.wechat import PhoneCodeRefused, WeChatUnavailable
from portraits.store.vault import KeyShredded

FIELD = "phone"


def _context(user_id: str) -> str:
    return f"users/{user_id}/phone"


def bind_phone(services, user: dict, code: str) -> dict:
    """Bind (or replace) the user's phone from a getPhoneNumber code; returns the updated user."""
    try:
        phone = services.wechat.user_phone_number(code)
    except PhoneCodeRefused as refused:
        raise Invalid("invalid_phone_code", "WeChat refused the phone code; ask the user to tap the button again.",
                      {"errcode": refused.errcode} if refused.errcode else {"reason": str(refused)})
    except WeChatUnavailable:
        raise Unavailable("wechat_unavailable", "WeChat did not answer; try again in a moment.")
    store_phone(services, user["_id"], phone, states.now())
    return services.db.users.find_one({"_id": user["_id"]})


def store_phone(services, user_id: str, phone: dict, bound_at) -> None:
    sealed = services.vault.seal(user_id, json.dumps(phone, sort_keys=True).encode(), _context(user_id))
    services.db.users.update_one({"_id": user_id}, {"$set": {FIELD: {"sealed": sealed, "bound_at": bound_at}}})


def phone_of(services, user: dict) -> dict | None:
    """The bound phone ({phone_number, pure_phone_number, country_code, bound_at}), or None. A record sealed under
    a key that is gone (a withdrawal that died before sealing it again) counts as unbound: bind again."""
    record = user.get(FIELD)
    if not record:
        return None
    try:
        opened = services.vault.open(user["_id"], bytes(record["sealed"]), _context(user["_id"]))
    except (KeyShredded, InvalidTag):
        return None
    return {**json.loads(opened), "bound_at": record.get("bound_at")}


def masked(phone: dict) -> str:
    """138****8000: the first three and last four digits of a mainland number, at most a third shown otherwise."""
    digits = phone["pure_phone_number"]
    keep_head, keep_tail = (3, 4) if len(digits) >= 11 else (len(digits) // 3, len(digits) // 3)
    return digits[:keep_head] + "*" * (len(digits) - keep_head - keep_tail) + digits[len(digits) - keep_tail:]


def require_phone(services, user: dict) -> None:
    if services.settings.require_phone and phone_of(services, user) is None:
        raise Forbidden("phone_required", "Bind a phone number first (the getPhoneNumber button).")
