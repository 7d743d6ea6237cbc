"""MongoDB through pymongo: MONGO_URI's server, or in embedded mode the instance's SecantusDB server
(`db_server`), or for in-process unit tests only mongomock."""
from __future__ import annotations

import functools
import threading

import pymongo
from pymongo import ASCENDING, DESCENDING

from portraits.config import ConfigError, Settings
from portraits.store import db_server


def connect(settings: Settings):
    """The database the settings name (a client is opened; pymongo reconnects by itself after a server restart)."""
    if settings.mongo_uri:
        client = pymongo.MongoClient(settings.mongo_uri, tz_aware=True)
    elif settings.embedded and settings.embedded_database == "secantus":
        client = pymongo.MongoClient(db_server.join(settings.instance_dir), tz_aware=True)
    elif settings.embedded:
        import mongomock

        _serialise_mongomock_writes()
        client = mongomock.MongoClient(tz_aware=True)
    else:
        raise ConfigError("MONGO_URI is unset (EMBEDDED=1 gives a local database server, for development only)")
    return client[settings.mongo_db]


_WRITE_LOCK = threading.RLock()


def _serialise_mongomock_writes() -> None:
    """Give the in-process database the per-document atomicity real MongoDB has.

    mongomock runs a conditional update (find_one_and_update, update_one with a filter) as a find followed by a
    write, so two threads could both match the same state; every compare-and-set in `states.transition` and the
    credit and refund claims relies on the server doing it as one step. One lock around mongomock's write paths
    restores that for the demo and the tests (threads of one process share one in-process database).
    """
    from mongomock.collection import Collection

    if getattr(Collection, "_portraits_serialised", False):
        return
    for name in ("_find_and_modify", "_update", "_insert", "_delete", "bulk_write"):
        original = getattr(Collection, name)

        def locked(self, *args, __original=original, **kwargs):
            with _WRITE_LOCK:
                return __original(self, *args, **kwargs)

        setattr(Collection, name, functools.wraps(original)(locked))
    Collection._portraits_serialised = True


# WeChat Pay redelivers a notification for about 24 hours; its record is kept well past that, then expires.
PAY_NOTIFICATION_TTL_S = 30 * 24 * 3600
MESSAGE_TTL_S = 30 * 24 * 3600
# Pushed verdicts are matched to their check within minutes; a week covers any late or replayed push.
CONTENT_VERDICT_TTL_S = 7 * 24 * 3600
SWEEP_HISTORY_S = 7 * 24 * 3600  # what each sweep did, for the console


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
    _ensure_ttl_index(db.pay_notifications, "received_at", PAY_NOTIFICATION_TTL_S)
    db.messages.create_index([("state", ASCENDING), ("created_at", ASCENDING)])
    db.messages.create_index("user_id")
    _ensure_ttl_index(db.messages, "created_at", MESSAGE_TTL_S)
    _ensure_ttl_index(db.sweeps, "at", SWEEP_HISTORY_S)
    db.orders.create_index("render_claims.at", sparse=True)
    # The sweep's express promises still open past their breach, or broken and owed (portraits.billing.promises).
    db.orders.create_index([("promise.state", ASCENDING), ("promise.breach_at", ASCENDING)], sparse=True)
    db.renders.create_index("refinement_claims.at", sparse=True)
    db.renders.create_index("retried_at", sparse=True)
    db.renders.create_index("image_checks_owed", sparse=True)
    db.label_log.create_index("content_id", unique=True)
    db.label_log.create_index("created_at")
    db.content_checks.create_index("trace_id", sparse=True)
    db.content_checks.create_index([("state", ASCENDING), ("created_at", ASCENDING)])
    db.content_checks.create_index("user_id")
    _ensure_ttl_index(db.content_verdicts, "received_at", CONTENT_VERDICT_TTL_S)
    # An invite card's code carries one seat's token: it opens that seat of one album only (portraits.albums).
    db.albums.create_index("seats.token", unique=True)
    db.albums.create_index("member_ids")
    db.albums.create_index([("state", ASCENDING), ("updated_at", ASCENDING)])
    db.albums.create_index("order_id")


def _ensure_ttl_index(collection, field: str, seconds: int) -> None:
    """A TTL index on ``field``; a plain index of the same key (from before the TTL existed) is replaced, since
    MongoDB refuses a second index on the same key with other options."""
    name = f"{field}_1"
    existing = collection.index_information().get(name)
    if existing is not None and existing.get("expireAfterSeconds") != seconds:
        collection.drop_index(name)
    collection.create_index(field, name=name, expireAfterSeconds=seconds)
