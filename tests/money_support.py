"""Helpers for the money tests: users and avatars placed straight into the database (no photos or training are
needed to move money), notifications signed and encrypted with the simulator's own keys, and a default-queue run."""
from __future__ import annotations

import secrets
from functools import lru_cache

from portraits import identity, states
from portraits.billing import orders
from tests.conftest import phone_for
from wechat_sim.signing import PlatformSigner, load_private_key


def add_user_and_avatar(services, sim, name: str = "alice", user: dict | None = None) -> tuple[dict, dict]:
    at = states.now()
    if user is None:
        # The simulator only takes prepay for openids it has issued.
        user = {"_id": "u_" + secrets.token_hex(6), "openid": sim.openid_of(name), "created_at": at, "consents": {}}
        services.db.users.insert_one(user)
        # Real identity, bound as POST /api/v1/me/phone would seal it (orders need it).
        services.vault.create_key(user["_id"])
        phone = phone_for(name)
        identity.store_phone(services, user["_id"], {"phone_number": phone, "pure_phone_number": phone,
                                                     "country_code": "86"}, at)
        user = services.db.users.find_one({"_id": user["_id"]})
    avatar = {"_id": "av_" + secrets.token_hex(6), "user_id": user["_id"], "gender": "female", "state": "ready",
              "photos": [], "created_at": at, "updated_at": at, "history": states.initial_history("ready", "test")}
    services.db.avatars.insert_one(avatar)
    return user, avatar


def place_order(services, sim, name: str = "alice") -> tuple[dict, dict, dict]:
    user, avatar = add_user_and_avatar(services, sim, name)
    return user, avatar, orders.create_order(services, user, avatar, "avatar_pack")


def paid_order(services, sim, name: str = "alice") -> dict:
    _, _, order = place_order(services, sim, name)
    paid = sim.pay(order["_id"])
    assert paid["status_code"] == 204, paid
    found = services.db.orders.find_one({"_id": order["_id"]})
    assert found["state"] == "paid"
    return found


def run_default_jobs(services, rounds: int = 20) -> None:
    """Refunds, notifications and periodic work: the default queue only, never training."""
    from jobs import context
    from portraits import tasks
    from jobs.worker import EmbeddedWorker

    context.install(services)
    worker = EmbeddedWorker([tasks.queue(services, tasks.DEFAULT)], connection=services.redis)
    for _ in range(rounds):
        if not worker.work(burst=True, with_scheduler=True, logging_level="ERROR"):
            break


def signed_notification(creds, resource: dict, *, event_type: str = "TRANSACTION.SUCCESS",
                        kind: str = "transaction", notification_id: str | None = None,
                        timestamp: int | None = None) -> tuple[dict, bytes]:
    """A WeChat Pay v3 callback exactly as the platform sends one: AES-256-GCM resource, RSA-SHA256 signature."""
    signer = PlatformSigner(_private_key(creds.platform_private_key_pem), creds.platform_public_key_id,
                            creds.apiv3_key)
    headers, body = signer.notification(resource, kind=kind, event_type=event_type, summary="支付成功",
                                        notification_id=notification_id, create_time="2026-11-26T12:00:00+08:00",
                                        timestamp=timestamp)
    return {**headers, "Content-Type": "application/json"}, body.encode()


@lru_cache(maxsize=4)
def _private_key(pem: str):
    return load_private_key(pem)


def transaction_for(order: dict, creds, **changes) -> dict:
    """The decrypted resource WeChat Pay would send for this order being paid."""
    resource = {
        "appid": creds.appid, "mchid": creds.mchid, "out_trade_no": order["_id"],
        "transaction_id": "42" + secrets.token_hex(10), "trade_type": "JSAPI", "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功", "bank_type": "OTHERS", "attach": "",
        "success_time": "2026-11-26T12:00:00+08:00", "payer": {"openid": order["openid"]},
        "amount": {"total": order["amount"], "payer_total": order["amount"], "currency": "CNY",
                   "payer_currency": "CNY"},
    }
    resource.update(changes)
    return resource


def history_targets(services, order_id: str) -> list[str]:
    return [entry["to"] for entry in services.db.orders.find_one({"_id": order_id})["history"]]
