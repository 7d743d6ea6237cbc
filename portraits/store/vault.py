"""Per-user encryption at rest (AES-256-GCM), the user's data key wrapped by a master key from the environment.

Deleting a user's wrapped key makes every copy of their sealed data unreadable, backups included
(crypto-shredding).
"""
from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PV1"


class KeyShredded(LookupError):
    pass


class Vault:
    def __init__(self, db, master_key: bytes):
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self.db = db
        self.master = AESGCM(master_key)

    def _data_key(self, user_id: str, create: bool) -> bytes:
        found = self.db.user_keys.find_one({"_id": user_id})
        if found is None:
            if not create:
                raise KeyShredded(user_id)
            key = AESGCM.generate_key(bit_length=256)
            nonce = os.urandom(12)
            wrapped = nonce + self.master.encrypt(nonce, key, user_id.encode())
            try:
                self.db.user_keys.insert_one({"_id": user_id, "wrapped": wrapped})
            except Exception:  # another process created it first; use theirs
                return self._data_key(user_id, create=False)
            return key
        wrapped = bytes(found["wrapped"])
        return self.master.decrypt(wrapped[:12], wrapped[12:], user_id.encode())

    def create_key(self, user_id: str) -> None:
        self._data_key(user_id, create=True)

    def seal(self, user_id: str, data: bytes, context: str) -> bytes:
        """Raises KeyShredded for a deleted user, so a job still running for them cannot write anything back."""
        nonce = os.urandom(12)
        sealed = AESGCM(self._data_key(user_id, create=False)).encrypt(nonce, data, context.encode())
        return MAGIC + nonce + sealed

    def open(self, user_id: str, sealed: bytes, context: str) -> bytes:
        if not sealed.startswith(MAGIC):
            raise ValueError("not sealed data")
        nonce, body = sealed[3:15], sealed[15:]
        return AESGCM(self._data_key(user_id, create=False)).decrypt(nonce, body, context.encode())

    def shred(self, user_id: str) -> None:
        self.db.user_keys.delete_one({"_id": user_id})


class SealedBlobs:
    """The blob store, sealed per user; the blob key is bound into the ciphertext so blobs cannot be swapped."""

    def __init__(self, blobs, vault: Vault):
        self.blobs = blobs
        self.vault = vault

    def put(self, user_id: str, key: str, data: bytes) -> None:
        self.blobs.put(key, self.vault.seal(user_id, data, key))

    def get(self, user_id: str, key: str) -> bytes:
        return self.vault.open(user_id, self.blobs.get(key), key)
