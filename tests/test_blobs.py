"""Blob stores: a directory by default, GridFS so workers on other machines share photos, weights and images."""
from __future__ import annotations

import pytest

from portraits.store.blobs import BlobNotFound, DirectoryBlobStore, GridFSBlobStore


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
