"""Scan every store the service writes to for traces of one user: their id, their openid and their photos' bytes.

Stores scanned:
- MongoDB: every document of every collection of ``services.db`` (GridFS's ``blobs.files``/``blobs.chunks``
  included when BLOB_STORE=gridfs), BSON-encoded so bytes fields are searched raw.
- The blob store: every file under the instance directory (blob root included), raw bytes, and its path.
- Redis: every key name and every value of every type (string, hash, list, set, zset, stream). Values are also
  searched expanded: zlib-decompressed (RQ's pickled job data: function, args, kwargs) and base64-decoded (RQ's
  results, whose return values are base64 pickles), so job arguments, meta and results are covered.

A finding is (store, where, needle name). Tests assert on the exact set of places that may still hold an id.
"""
from __future__ import annotations

import base64
import binascii
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import bson

_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


@dataclass(frozen=True)
class Finding:
    store: str  # "mongo", "blobs", "redis"
    where: str  # collection, file path relative to the instance dir, or Redis key
    needle: str


def photo_samples(data: bytes, name: str, count: int = 4, size: int = 24) -> dict[str, bytes]:
    """Byte substrings from the entropy-coded body of an encoded photo (headers and tables are shared between
    JPEGs, so they would match any photo and prove nothing)."""
    samples = {}
    for index in range(count):
        at = int(len(data) * (0.3 + 0.6 * index / max(count - 1, 1)))
        at = min(at, len(data) - size)
        samples[f"{name}@{at}"] = data[at:at + size]
    return samples


def _expanded(raw: bytes, depth: int = 0):
    yield raw
    if depth >= 2 or len(raw) < 8:
        return
    try:
        yield from _expanded(zlib.decompress(raw), depth + 1)
    except zlib.error:
        pass
    if _BASE64.match(raw) and len(raw.strip()) % 4 == 0:
        try:
            yield from _expanded(base64.b64decode(raw, validate=False), depth + 1)
        except (binascii.Error, ValueError):
            pass


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)):
        return str(value).encode()
    return str(value).encode("utf-8", "surrogatepass")


def _needle_bytes(needles: dict[str, bytes | str]) -> dict[str, bytes]:
    return {name: value.encode() if isinstance(value, str) else value for name, value in needles.items() if value}


class StoreScanner:
    def __init__(self, services):
        self.services = services

    def scan(self, needles: dict[str, bytes | str]) -> set[Finding]:
        wanted = _needle_bytes(needles)
        found: set[Finding] = set()
        for store, where, chunks in self._stores():
            for chunk in chunks:
                for piece in _expanded(chunk):
                    for name, needle in wanted.items():
                        if needle in piece:
                            found.add(Finding(store, where, name))
        return found

    def _stores(self):
        yield from self._mongo()
        yield from self._files()
        yield from self._redis()

    def _mongo(self):
        db = self.services.db
        for name in db.list_collection_names():
            for document in db[name].find():
                try:
                    encoded = bson.encode(document)
                except Exception:  # a value BSON cannot hold would not have reached a real MongoDB either
                    encoded = repr(document).encode()
                yield "mongo", name, [encoded, repr(document).encode()]

    def _files(self):
        instance = Path(self.services.settings.instance_dir)
        blob_root = Path(self.services.settings.blob_root)
        roots = [instance] + ([] if blob_root.is_relative_to(instance) else [blob_root])
        for root in roots:
            if not root.exists():
                continue
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    relative = path.relative_to(root).as_posix()
                    yield "blobs", relative, [relative.encode(), path.read_bytes()]

    def _redis(self):
        redis = self.services.redis
        for key in redis.scan_iter(count=500):
            kind = redis.type(key).decode()
            values: list[bytes] = [key]
            if kind == "string":
                values.append(redis.get(key) or b"")
            elif kind == "hash":
                for field, value in redis.hgetall(key).items():
                    values += [field, value]
            elif kind == "list":
                values += redis.lrange(key, 0, -1)
            elif kind == "set":
                values += list(redis.smembers(key))
            elif kind == "zset":
                values += [member for member, _ in redis.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                for entry_id, fields in redis.xrange(key):
                    values.append(entry_id)
                    for field, value in fields.items():
                        values += [field, value]
            elif kind != "none":
                raise AssertionError(f"store scan cannot read Redis type {kind!r} of {key!r}")
            yield "redis", key.decode(errors="replace"), [_as_bytes(v) for v in values]


def places(findings: set[Finding], needle_prefix: str = "") -> set[tuple[str, str]]:
    """(store, where) of the findings whose needle name starts with ``needle_prefix``; Redis keys and blob paths are
    generalised (ids replaced by '*') so tests can state the allowed places."""
    def general(where: str) -> str:
        where = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "*", where)  # RQ's uuid job ids
        return re.sub(r"\b(u|av|rd|ph|img)_[0-9a-f]{8,}|\bP[0-9]{8}[0-9A-F]{12}", "*", where)

    return {(f.store, general(f.where)) for f in findings if f.needle.startswith(needle_prefix)}
