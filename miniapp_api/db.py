"""MongoDB through pymongo; in-process mongomock when MONGO_URI is unset (demo and tests)."""
from __future__ import annotations

import pymongo
from pymongo import ASCENDING, DESCENDING


def connect(mongo_uri: str | None, db_name: str):
    if mongo_uri:
        client = pymongo.MongoClient(mongo_uri, tz_aware=True)
    else:
        import mongomock

        client = mongomock.MongoClient(tz_aware=True)
    return client[db_name]


def ensure_indexes(db) -> None:
    db.users.create_index("openid", unique=True)
    db.avatars.create_index([("user_id", ASCENDING), ("created_at", DESCENDING)])
    db.avatars.create_index([("state", ASCENDING), ("updated_at", ASCENDING)])
    db.orders.create_index([("user_id", ASCENDING), ("created_at", DESCENDING)])
    db.orders.create_index("transaction_id", sparse=True)
    db.orders.create_index([("state", ASCENDING), ("created_at", ASCENDING)])
    # One open order per avatar: the key exists only while the order is open.
    db.orders.create_index("open_avatar_id", unique=True, sparse=True)
    db.orders.create_index("refunds.out_refund_no", sparse=True)
    db.renders.create_index([("user_id", ASCENDING), ("created_at", DESCENDING)])
    db.renders.create_index("avatar_id")
    db.images.create_index("user_id")
    db.images.create_index("render_id")
    db.images.create_index("content_id", unique=True)
    db.pay_notifications.create_index("received_at")
    db.label_log.create_index("content_id", unique=True)
    db.label_log.create_index("created_at")
