"""WeChat Pay v3 signatures and encrypted resources, as the platform produces and checks them.

Written against `cryptography` directly rather than through the SDKs the app uses, so a misunderstanding in the
app side or in an SDK shows up as a failure instead of agreeing with itself. Tests that forge or replay platform
callbacks sign with these same functions.
"""
from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wechat_sim.keys import SimCredentials

SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
CHINA_TZ = timezone(timedelta(hours=8))


def rfc3339_now() -> str:
    return datetime.now(CHINA_TZ).isoformat(timespec="seconds")


def load_private_key(pem: str):
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def load_public_key(pem: str):
    return serialization.load_pem_public_key(pem.encode("ascii"))


def sign(private_key, message: str) -> str:
    """SHA256-with-RSA (PKCS#1 v1.5) over the UTF-8 message, base64-encoded."""
    signature = private_key.sign(message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def verify(public_key, message: str, signature_b64: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), message.encode("utf-8"),
                          padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def request_message(method: str, url: str, timestamp: str, nonce: str, body: str) -> str:
    """What a merchant signs for its Authorization header; url is the path with its query string."""
    return f"{method}\n{url}\n{timestamp}\n{nonce}\n{body}\n"


def platform_message(timestamp: str, nonce: str, body: str) -> str:
    """What the platform signs on every response and callback (the Wechatpay-Signature header)."""
    return f"{timestamp}\n{nonce}\n{body}\n"


def signed_headers(private_key, serial: str, body: str, *, timestamp: int | None = None) -> dict:
    """The Wechatpay-* headers the platform puts on a response or callback carrying body."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = secrets.token_hex(16).upper()
    return {
        "Wechatpay-Timestamp": stamp,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": sign(private_key, platform_message(stamp, nonce, body)),
        "Wechatpay-Serial": serial,
        "Wechatpay-Signature-Type": SIGNATURE_TYPE,
    }


def encrypt_resource(apiv3_key: str, plain: dict, associated_data: str) -> dict:
    """A callback's AEAD_AES_256_GCM `resource` object; associated_data is the resource kind."""
    nonce = secrets.token_hex(6)  # 12 ASCII characters, used as the 12-byte GCM nonce like WeChat does
    ciphertext = AESGCM(apiv3_key.encode("ascii")).encrypt(
        nonce.encode("ascii"), json.dumps(plain, ensure_ascii=False).encode("utf-8"),
        associated_data.encode("utf-8"))
    return {"algorithm": "AEAD_AES_256_GCM", "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
            "associated_data": associated_data, "nonce": nonce, "original_type": associated_data}


class PlatformSigner:
    """The WeChat Pay platform's side of v3 for one set of keys: signs responses and seals callbacks."""

    def __init__(self, private_key, serial: str, apiv3_key: str):
        self.private_key = private_key
        self.serial = serial
        self.apiv3_key = apiv3_key

    @classmethod
    def from_credentials(cls, creds: SimCredentials) -> PlatformSigner:
        return cls(load_private_key(creds.platform_private_key_pem), creds.platform_public_key_id, creds.apiv3_key)

    def headers(self, body: str, *, timestamp: int | None = None) -> dict:
        return signed_headers(self.private_key, self.serial, body, timestamp=timestamp)

    def notification_body(self, resource: dict, *, kind: str, event_type: str, summary: str,
                          notification_id: str, create_time: str | None = None) -> str:
        """A callback's JSON body; kind ("transaction", "refund") is the resource's associated data."""
        return json.dumps({
            "id": notification_id,
            "create_time": create_time or rfc3339_now(),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": encrypt_resource(self.apiv3_key, resource, kind),
        }, ensure_ascii=False)

    def notification(self, resource: dict, *, kind: str, event_type: str, summary: str,
                     notification_id: str | None = None, create_time: str | None = None,
                     timestamp: int | None = None) -> tuple[dict, str]:
        """A complete callback as the platform POSTs it: (signed headers, body)."""
        body = self.notification_body(resource, kind=kind, event_type=event_type, summary=summary,
                                      notification_id=notification_id or str(uuid.uuid4()),
                                      create_time=create_time)
        return self.headers(body, timestamp=timestamp), body
