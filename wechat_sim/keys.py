"""Credentials the simulator plays with: an app (with its message-push Token and EncodingAESKey), a merchant key pair
and a WeChat Pay platform key pair."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import string
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CREDENTIALS_FILE = "wechat_sim_credentials.json"


@dataclass(frozen=True)
class SimCredentials:
    appid: str
    app_secret: str
    mchid: str
    merchant_private_key_pem: str
    merchant_public_key_pem: str
    merchant_cert_serial_no: str
    platform_private_key_pem: str
    platform_public_key_pem: str
    platform_public_key_id: str
    apiv3_key: str
    # Virtual payment (xpay) and the message push (消息推送) as the developer configures them in WeChat's console.
    # Derived from the app secret when a credentials file written before they existed is loaded, so every process of
    # an instance agrees on them without rewriting the file.
    xpay_offer_id: str = ""
    xpay_app_key: str = ""  # the production AppKey (env 0)
    xpay_sandbox_app_key: str = ""  # the sandbox AppKey (env 1)
    push_token: str = ""  # the message-push Token: 32 letters and digits
    push_aes_key: str = ""  # its EncodingAESKey: the 43 characters of a base64 32-byte key without its padding
    original_id: str = ""  # the mini-program's original id (gh_...), the ToUserName of every push

    def __post_init__(self):
        derived = {
            "xpay_offer_id": str(1_450_000_000 + int(self._derive("offer_id")[:8], 16) % 99_999_999),
            "xpay_app_key": self._derive("xpay_app_key")[:32],
            "xpay_sandbox_app_key": self._derive("xpay_sandbox_app_key")[:32],
            "push_token": self._derive("push_token")[:32],
            "push_aes_key": base64.b64encode(bytes.fromhex(self._derive("push_aes_key"))).decode("ascii").rstrip("="),
            "original_id": "gh_" + self._derive("original_id")[:12],
        }
        for name, value in derived.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)

    def _derive(self, purpose: str) -> str:
        return hmac.new(self.app_secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def _read(path: pathlib.Path) -> SimCredentials:
    return SimCredentials(**json.loads(path.read_text(encoding="utf-8")))


def _rsa_key_pair_pem() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return private_pem, public_pem


def generate_credentials() -> SimCredentials:
    merchant_private, merchant_public = _rsa_key_pair_pem()
    platform_private, platform_public = _rsa_key_pair_pem()
    alphabet = string.ascii_letters + string.digits
    return SimCredentials(
        appid="wx" + secrets.token_hex(8),
        app_secret=secrets.token_hex(16),
        mchid=str(1_600_000_000 + secrets.randbelow(99_999_999)),
        merchant_private_key_pem=merchant_private,
        merchant_public_key_pem=merchant_public,
        merchant_cert_serial_no=secrets.token_hex(20).upper(),
        platform_private_key_pem=platform_private,
        platform_public_key_pem=platform_public,
        platform_public_key_id="PUB_KEY_ID_" + "".join(secrets.choice(string.digits) for _ in range(28)),
        apiv3_key="".join(secrets.choice(alphabet) for _ in range(32)),
    )


def load_or_create_credentials(directory: pathlib.Path) -> SimCredentials:
    """Keys survive restarts so callbacks signed before a restart still verify and the app's config stays valid."""
    directory = pathlib.Path(directory)
    path = directory / CREDENTIALS_FILE
    if path.exists():
        return _read(path)
    directory.mkdir(parents=True, exist_ok=True)
    creds = generate_credentials()
    tmp_path = directory / f".{CREDENTIALS_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(creds), handle, indent=2)
    try:
        # A concurrent starter may have won the race: keep whichever file landed first.
        os.link(tmp_path, path)
    except FileExistsError:
        return _read(path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return creds
