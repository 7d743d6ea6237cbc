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
    # The message push (消息推送) as the developer configures it in WeChat's console. Credential files written before
    # these existed get values derived from the app secret (derived_push_settings), the same in every process.
    push_token: str = ""
    push_aes_key: str = ""


def derived_push_settings(app_secret: str) -> tuple[str, str]:
    """(Token, EncodingAESKey) derived from the app secret: a Token of 32 letters and digits and the 43 characters
    of a base64 32-byte key without its padding, as WeChat's console generates them."""
    token = hmac.new(app_secret.encode(), b"push-token", hashlib.sha256).hexdigest()[:32]
    key = hmac.new(app_secret.encode(), b"push-aes-key", hashlib.sha256).digest()
    return token, base64.b64encode(key).decode("ascii").rstrip("=")


def _read(path: pathlib.Path) -> SimCredentials:
    creds = SimCredentials(**json.loads(path.read_text(encoding="utf-8")))
    if creds.push_token and creds.push_aes_key:
        return creds
    token, aes_key = derived_push_settings(creds.app_secret)
    return dataclasses.replace(creds, push_token=creds.push_token or token, push_aes_key=creds.push_aes_key or aes_key)


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
    app_secret = secrets.token_hex(16)
    push_token, push_aes_key = derived_push_settings(app_secret)
    return SimCredentials(
        appid="wx" + secrets.token_hex(8),
        app_secret=app_secret,
        mchid=str(1_600_000_000 + secrets.randbelow(99_999_999)),
        merchant_private_key_pem=merchant_private,
        merchant_public_key_pem=merchant_public,
        merchant_cert_serial_no=secrets.token_hex(20).upper(),
        platform_private_key_pem=platform_private,
        platform_public_key_pem=platform_public,
        platform_public_key_id="PUB_KEY_ID_" + "".join(secrets.choice(string.digits) for _ in range(28)),
        apiv3_key="".join(secrets.choice(alphabet) for _ in range(32)),
        push_token=push_token,
        push_aes_key=push_aes_key,
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
