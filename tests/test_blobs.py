"""Blob stores: a directory by default, GridFS so workers on other machines share photos, weights and images."""
from __future__ import annotations

import errno
import os

import pytest

from portraits.store.blobs import BlobNotFound, DirectoryBlobStore, GridFSBlobStore
from tests.test_queue import quick_paid_avatar


@pytest.fixture(params=["dir", "gridfs"])
def store(request, tmp_path):
    if request.param == "dir":
        return DirectoryBlobStore(tmp_path / "blobs")
    import mongomock
    import mongomock.gridfs

    mongomock.gridfs.enable_gridfs_integration()
    return GridFSBlobStore(mongomock.MongoClient()["blobs_test"])


def test_put_get_replace_delete(store):
    store.put("users/u1/a.bin", b"one")
    store.put("users/u1/a.bin", b"two")
    assert store.get("users/u1/a.bin") == b"two"
    assert store.exists("users/u1/a.bin")
    store.delete("users/u1/a.bin")
    assert not store.exists("users/u1/a.bin")
    with pytest.raises(BlobNotFound):
        store.get("users/u1/a.bin")


def test_delete_prefix_removes_only_that_user(store):
    for key in ("users/u1/x/1", "users/u1/y/2", "users/u10/z"):
        store.put(key, b"data")
    assert store.delete_prefix("users/u1/") == 2
    assert sorted(store.keys()) == ["users/u10/z"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "."])
def test_keys_cannot_escape_the_store(tmp_path, key):
    with pytest.raises(ValueError):
        DirectoryBlobStore(tmp_path).put(key, b"x")


def test_sealed_blobs_are_unreadable_without_the_users_key(services):
    from portraits.store.vault import KeyShredded

    services.vault.create_key("u1")
    services.sealed.put("u1", "users/u1/secret", b"face bytes")
    raw = services.blobs.get("users/u1/secret")
    assert b"face bytes" not in raw
    assert services.sealed.get("u1", "users/u1/secret") == b"face bytes"
    services.blobs.put("users/u1/moved", raw)
    with pytest.raises(Exception):
        services.sealed.get("u1", "users/u1/moved")  # the key is bound into the ciphertext
    services.vault.shred("u1")
    with pytest.raises(KeyShredded):
        services.sealed.get("u1", "users/u1/secret")


def test_a_full_disk_leaves_no_temporary_file_and_keeps_the_old_blob(tmp_path, monkeypatch):
    store = DirectoryBlobStore(tmp_path)
    store.put("users/u1/lora.safetensors", b"old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as error:
        store.put("users/u1/lora.safetensors", b"new" * 1000)
    assert error.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "users/u1").iterdir()] == ["lora.safetensors"]
    assert store.get("users/u1/lora.safetensors") == b"old"


@pytest.mark.parametrize("settings_overrides", [{"train_retries": 1}])
def test_a_training_whose_weights_cannot_be_stored_is_retried_then_refunded(services, login, sim, drain, monkeypatch):
    def disk_full(key, data):
        if key.endswith("lora.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(key, data)

    real_put = services.blobs.put
    monkeypatch.setattr(services.blobs, "put", disk_full)
    avatar, order = quick_paid_avatar(services, login("full"), sim)
    drain()
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["state"] == "failed" and stored["train_attempts"] == 2
    assert services.db.orders.find_one({"_id": order["id"]})["state"] in ("refunding", "refunded")
    assert not [p for p in services.settings.blob_root.rglob(".tmp-*")]
