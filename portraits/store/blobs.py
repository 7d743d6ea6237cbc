"""Blob store for photos, LoRA weights and images: a directory by default, GridFS so remote workers share it."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


class BlobNotFound(KeyError):
    pass


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bad blob key {key!r}")


class DirectoryBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # a disk that fills up says so here, before the blob is visible
            os.replace(tmp, path)
        except BaseException:
            # Disk full, a failing disk, a kill: no half-written temporary file stays behind; the caller's job
            # fails and is retried or refunded like any technical failure.
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as error:
            raise BlobNotFound(key) from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        _check_key(prefix.rstrip("/"))
        base = self.root / prefix.rstrip("/")
        count = 0
        if base.is_dir():
            for path in sorted(base.rglob("*"), reverse=True):
                if path.is_file():
                    path.unlink()
                    count += 1
                else:
                    path.rmdir()
            base.rmdir()
        return count

    def keys(self, prefix: str = ""):
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key


class GridFSBlobStore:
    def __init__(self, db):
        import gridfs

        self.fs = gridfs.GridFS(db, collection="blobs")

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        old = [f._id for f in self.fs.find({"filename": key})]
        self.fs.put(data, filename=key)
        for file_id in old:
            self.fs.delete(file_id)

    def get(self, key: str) -> bytes:
        found = self.fs.find_one({"filename": key}, sort=[("uploadDate", -1)])
        if found is None:
            raise BlobNotFound(key)
        return found.read()

    def exists(self, key: str) -> bool:
        return self.fs.exists({"filename": key})

    def delete(self, key: str) -> None:
        for found in self.fs.find({"filename": key}):
            self.fs.delete(found._id)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for key in list(self.keys(prefix)):
            self.delete(key)
            count += 1
        return count

    def keys(self, prefix: str = ""):
        for found in self.fs.find({"filename": {"$regex": "^" + re.escape(prefix)}}):
            yield found.filename


def open_blob_store(kind: str, root: Path, db):
    if kind == "gridfs":
        return GridFSBlobStore(db)
    return DirectoryBlobStore(root)
