"""The mini-program message push (消息推送) as WeChat sends it: events POSTed to the URL the developer configured,
signed with its Token and, in safe mode, AES-encrypted with its EncodingAESKey, as JSON or XML.

Written from WeChat's documentation with `cryptography` alone (no wechatpy), so the app's side, which uses wechatpy,
is checked against an independent implementation:
- `signature` = sha1 of the sorted, concatenated [token, timestamp, nonce], in the query string of every push;
- safe mode adds `encrypt_type=aes` and `msg_signature` = sha1 of the sorted [token, timestamp, nonce, Encrypt];
  Encrypt = base64(AES-256-CBC(key, iv=key[:16], PKCS#7 to 32 bytes)(16 random bytes + 4-byte big-endian length
  + message + appid)), key = base64 of the EncodingAESKey plus "=".
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
from dataclasses import dataclass
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODES = ("plaintext", "safe")
FORMATS = ("json", "xml")
AES_BLOCK = 32  # WeChat pads to 32 bytes, not AES's 16


@dataclass(frozen=True)
class PushConfig:
    """What the developer set in WeChat's console: the URL, the Token, the EncodingAESKey, the mode, the format."""

    url: str | None
    token: str
    aes_key: str
    mode: str = "safe"
    data_format: str = "json"


def sha1_signature(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def encrypt(aes_key: str, appid: str, message: bytes) -> str:
    key = base64.b64decode(aes_key + "=")
    body = secrets.token_bytes(16) + struct.pack(">I", len(message)) + message + appid.encode("utf-8")
    pad = AES_BLOCK - len(body) % AES_BLOCK
    body += bytes([pad]) * pad
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(body) + encryptor.finalize()).decode("ascii")


def decrypt(aes_key: str, encrypted: str) -> tuple[bytes, str]:
    """(message, appid): the inverse of encrypt, for the simulator's own tests."""
    key = base64.b64decode(aes_key + "=")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = decryptor.update(base64.b64decode(encrypted)) + decryptor.finalize()
    plain = plain[:-plain[-1]]
    length = struct.unpack(">I", plain[16:20])[0]
    return plain[20:20 + length], plain[20 + length:].decode("utf-8")


def to_xml(message: dict) -> str:
    """A push as WeChat's XML: one element per field, a list as repeated elements, a dict as nested ones."""
    def element(name: str, value) -> str:
        if isinstance(value, list):
            return "".join(element(name, item) for item in value)
        if isinstance(value, dict):
            return f"<{name}>" + "".join(element(k, v) for k, v in value.items()) + f"</{name}>"
        if isinstance(value, str):
            return f"<{name}><![CDATA[{value}]]></{name}>"
        return f"<{name}>{escape(str(value))}</{name}>"

    return "<xml>" + "".join(element(k, v) for k, v in message.items()) + "</xml>"


def render(message: dict, data_format: str) -> str:
    return to_xml(message) if data_format == "xml" else json.dumps(message, ensure_ascii=False)


def signed_push(config: PushConfig, appid: str, to_user: str, message: dict, *, timestamp: int | None = None,
                nonce: str | None = None) -> tuple[dict, bytes, str]:
    """(query parameters, body, content type) of one push as WeChat sends it in the configured mode and format."""
    timestamp_s = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or str(secrets.randbelow(10**10))
    params = {"signature": sha1_signature(config.token, timestamp_s, nonce), "timestamp": timestamp_s,
              "nonce": nonce}
    content_type = "text/xml" if config.data_format == "xml" else "application/json"
    plain = render(message, config.data_format)
    if config.mode != "safe":
        return params, plain.encode("utf-8"), content_type
    encrypted = encrypt(config.aes_key, appid, plain.encode("utf-8"))
    params.update(encrypt_type="aes", msg_signature=sha1_signature(config.token, timestamp_s, nonce, encrypted))
    envelope = {"ToUserName": to_user, "Encrypt": encrypted}
    return params, render(envelope, config.data_format).encode("utf-8"), content_type

