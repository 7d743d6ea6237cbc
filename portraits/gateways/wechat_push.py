"""The mini-program's message push (消息推送) as WeChat sends it, verified: the GET check of the URL and the POSTed
events, in plaintext or safe (AES) mode, JSON or XML (whichever the developer chose in WeChat's console; both are
read here). wechatpy does the signature and the AES (wechatpy.utils.check_signature, wechatpy.crypto.WeChatCrypto).

Every refusal is a PushRejected with a stable code and the status to answer; nothing is read from a push before
its signature holds:
- `signature` (sha1 of the sorted Token, timestamp, nonce) must match: push_signature_invalid;
- the timestamp must be within max_age_s of now: push_expired; the same (timestamp, nonce, signature) seen before:
  push_replayed (claimed in Redis for twice max_age_s when it arrives, released if handling it fails, so
  WeChat's retry of a push we failed is taken);
- safe mode: a plaintext push is refused (push_encryption_required); `msg_signature` over the Encrypt field must
  match (push_msg_signature_invalid); the decrypted appid must be ours (push_appid_mismatch); a body that does not
  decrypt is push_undecryptable;
- an event naming another appid: push_appid_mismatch; a body that is neither JSON nor XML: push_malformed.
"""
from __future__ import annotations

import binascii
import json
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from xml.parsers.expat import ExpatError

import xmltodict
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException
from wechatpy.utils import check_signature

from portraits import keys


class PushRejected(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PushVerifier:
    token: str
    aes_key: str
    appid: str
    mode: str
    max_age_s: int

    def verify_url(self, args) -> str:
        """The echostr to answer WeChat's GET check of the URL with."""
        self._check_signature(args)
        return args.get("echostr", "")

    def parse(self, args, body: bytes) -> dict:
        """The event of a POSTed push, verified and decrypted."""
        timestamp, nonce = self._check_signature(args)
        encrypted = args.get("encrypt_type") == "aes"
        if not encrypted and self.mode == "safe":
            raise PushRejected(403, "push_encryption_required", "This endpoint takes encrypted pushes only.")
        envelope = parse_body(body)
        if encrypted:
            envelope = parse_body(self._decrypt(envelope, args.get("msg_signature", ""), timestamp, nonce))
        if envelope.get("appid") not in (None, self.appid):
            raise PushRejected(403, "push_appid_mismatch", "The push is for another mini-program.")
        return envelope

    def _check_signature(self, args) -> tuple[str, str]:
        signature, timestamp, nonce = (args.get(name, "") for name in ("signature", "timestamp", "nonce"))
        if not (self.token and signature and timestamp and nonce):
            raise PushRejected(403, "push_signature_invalid", "The push is not signed.")
        try:
            check_signature(self.token, signature, timestamp, nonce)
        except InvalidSignatureException:
            raise PushRejected(403, "push_signature_invalid", "The push's signature does not hold.") from None
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.max_age_s:
            raise PushRejected(403, "push_expired", "The push's timestamp is too old (or in the future).")
        return timestamp, nonce

    def _decrypt(self, envelope: dict, msg_signature: str, timestamp: str, nonce: str) -> str:
        if not self.aes_key:
            raise PushRejected(403, "push_encryption_required", "No EncodingAESKey is configured.")
        if not isinstance(envelope.get("Encrypt"), str):
            raise PushRejected(400, "push_malformed", "An encrypted push carries an Encrypt field.")
        crypto = WeChatCrypto(self.token, self.aes_key, self.appid)
        try:
            return crypto.decrypt_message({"Encrypt": envelope["Encrypt"]}, msg_signature, timestamp, nonce)
        except InvalidSignatureException:
            raise PushRejected(403, "push_msg_signature_invalid", "The push's msg_signature does not hold.") from None
        except InvalidAppIdException:
            raise PushRejected(403, "push_appid_mismatch", "The push is for another mini-program.") from None
        except (ValueError, binascii.Error, struct.error, IndexError, UnicodeDecodeError):
            raise PushRejected(400, "push_undecryptable", "The push does not decrypt.") from None


def parse_body(body: bytes | str) -> dict:
    """A push's body, JSON or XML, as a dict (XML values are strings, as WeChat's XML has no types)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        if text.lstrip().startswith("<"):
            parsed = xmltodict.parse(text).get("xml")
        else:
            parsed = json.loads(text)
    except (ValueError, ExpatError):
        raise PushRejected(400, "push_malformed", "The push is neither JSON nor XML.") from None
    if not isinstance(parsed, dict):
        raise PushRejected(400, "push_malformed", "The push is not an object.")
    return parsed


@contextmanager
def first_delivery(redis, args, max_age_s: int):
    """Refuse a push seen before (push_replayed); the push counts as seen once its handling succeeded."""
    key = keys.push_nonce(args.get("timestamp", ""), args.get("nonce", ""), args.get("signature", ""))
    if not redis.set(key, 1, nx=True, ex=max_age_s * 2):
        raise PushRejected(403, "push_replayed", "This push was received before.")
    try:
        yield
    except BaseException:
        redis.delete(key)
        raise
