"""Settings, read once from environment variables.

Every variable is listed in the README's configuration table with its default. An unset WeChat base URL means
"embedded defaults": the local WeChat simulator is started in-process and its generated keys are used.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SKUS = {"avatar_pack": {"amount": 990, "render_sets": 3, "description": "AI写真 数字分身套餐"}}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    instance_dir: Path = Path("instance")
    secret_key: str = ""
    master_key: bytes = b""
    public_base_url: str = "http://127.0.0.1:8000"

    mongo_uri: str | None = None
    mongo_db: str = "portraits"
    redis_url: str | None = None
    blob_store: str = "dir"
    blob_dir: Path | None = None

    wechat_appid: str = ""
    wechat_secret: str = ""
    wechat_api_base: str | None = None
    wechatpay_mchid: str = ""
    wechatpay_private_key_pem: str = ""
    wechatpay_cert_serial_no: str = ""
    wechatpay_apiv3_key: str = ""
    wechatpay_public_key_pem: str = ""
    wechatpay_public_key_id: str = ""
    wechatpay_api_base: str | None = None
    wechatpay_timeout_s: float = 10.0
    callback_max_age_s: int = 300
    subscribe_templates: dict = field(default_factory=dict)

    token_ttl_s: int = 7 * 24 * 3600
    consent_version: str = "2026-11-01"
    provider_name: str = "妙像AI写真"

    min_photos: int = 8
    max_photos: int = 30
    max_upload_bytes: int = 15 * 1024 * 1024
    max_pixels: int = 40_000_000
    collecting_ttl_s: int = 7 * 24 * 3600

    skus: dict = field(default_factory=lambda: dict(DEFAULT_SKUS))
    order_expire_s: int = 1800
    reconcile_grace_s: int = 300
    refund_backoff_s: tuple = (5, 30, 120, 600, 1800)
    refund_closed_retries: int = 2
    undeliverable_failed_renders: int = 3

    base_model_path: str | None = None
    train_steps: int | None = None
    train_resolution: int = 512
    lora_rank: int = 8
    render_max_steps: int | None = None
    render_max_candidates: int | None = None
    train_retries: int = 2
    render_retries: int = 1
    fault_train_failures: int = 0
    fault_render_failures: int = 0
    worker_heartbeat_s: int = 10
    worker_dead_after_s: int = 45
    worker_stop_grace_s: float = 20.0
    cjk_font_path: str | None = None

    support_refund_limit_fen: int = 990
    console_secure_cookies: bool = True
    console_session_ttl_s: int = 8 * 3600
    console_login_max_failures: int = 5
    console_login_lockout_s: int = 15 * 60
    console_timezone: str = "Asia/Shanghai"

    @property
    def blob_root(self) -> Path:
        return self.blob_dir or self.instance_dir / "blobs"

    @property
    def embedded_wechat(self) -> bool:
        return not self.wechat_api_base

    @property
    def uses_tiny_model(self) -> bool:
        return not self.base_model_path

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        instance_dir = Path(env.get("INSTANCE_DIR", "instance")).resolve()
        tiny = not env.get("BASE_MODEL_PATH")
        return cls(
            instance_dir=instance_dir,
            secret_key=env.get("SECRET_KEY") or _persistent_secret(instance_dir / "secret_key"),
            master_key=_master_key(env.get("MASTER_KEY") or _persistent_secret(instance_dir / "master_key", 32)),
            public_base_url=env.get("PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
            mongo_uri=env.get("MONGO_URI") or None,
            mongo_db=env.get("MONGO_DB", "portraits"),
            redis_url=env.get("REDIS_URL") or None,
            blob_store=_choice(env, "BLOB_STORE", "dir", {"dir", "gridfs"}),
            blob_dir=Path(env["BLOB_DIR"]).resolve() if env.get("BLOB_DIR") else None,
            wechat_appid=env.get("WECHAT_APPID", ""),
            wechat_secret=env.get("WECHAT_SECRET", ""),
            wechat_api_base=env.get("WECHAT_API_BASE") or None,
            wechatpay_mchid=env.get("WECHATPAY_MCHID", ""),
            wechatpay_private_key_pem=_read_file(env.get("WECHATPAY_PRIVATE_KEY_PATH")),
            wechatpay_cert_serial_no=env.get("WECHATPAY_CERT_SERIAL_NO", ""),
            wechatpay_apiv3_key=env.get("WECHATPAY_APIV3_KEY", ""),
            wechatpay_public_key_pem=_read_file(env.get("WECHATPAY_PUBLIC_KEY_PATH")),
            wechatpay_public_key_id=env.get("WECHATPAY_PUBLIC_KEY_ID", ""),
            wechatpay_api_base=env.get("WECHATPAY_API_BASE") or None,
            wechatpay_timeout_s=_number(env, "WECHATPAY_TIMEOUT_S", 10.0, float),
            callback_max_age_s=_number(env, "CALLBACK_MAX_AGE_S", 300),
            subscribe_templates=_json(env, "SUBSCRIBE_TEMPLATES", {}),
            token_ttl_s=_number(env, "TOKEN_TTL_S", 7 * 24 * 3600),
            consent_version=env.get("CONSENT_VERSION", "2026-11-01"),
            provider_name=env.get("PROVIDER_NAME", "妙像AI写真"),
            min_photos=_number(env, "MIN_PHOTOS", 8),
            max_photos=_number(env, "MAX_PHOTOS", 30),
            max_upload_bytes=_number(env, "MAX_UPLOAD_BYTES", 15 * 1024 * 1024),
            max_pixels=_number(env, "MAX_PIXELS", 40_000_000),
            collecting_ttl_s=_number(env, "COLLECTING_TTL_S", 7 * 24 * 3600),
            skus=_json(env, "SKUS", dict(DEFAULT_SKUS)),
            order_expire_s=_number(env, "ORDER_EXPIRE_S", 1800),
            reconcile_grace_s=_number(env, "RECONCILE_GRACE_S", 300),
            refund_backoff_s=_int_list(env, "REFUND_BACKOFF_S", (5, 30, 120, 600, 1800)),
            refund_closed_retries=_number(env, "REFUND_CLOSED_RETRIES", 2),
            undeliverable_failed_renders=_number(env, "UNDELIVERABLE_FAILED_RENDERS", 3),
            base_model_path=env.get("BASE_MODEL_PATH") or None,
            train_steps=_number(env, "TRAIN_STEPS", 30 if tiny else None),
            train_resolution=_number(env, "TRAIN_RESOLUTION", 64 if tiny else 512),
            lora_rank=_number(env, "LORA_RANK", 8),
            render_max_steps=_number(env, "RENDER_MAX_STEPS", 4 if tiny else None),
            render_max_candidates=_number(env, "RENDER_MAX_CANDIDATES", None),
            train_retries=_number(env, "TRAIN_RETRIES", 2),
            render_retries=_number(env, "RENDER_RETRIES", 1),
            fault_train_failures=_number(env, "FAULT_TRAIN_FAILURES", 0),
            fault_render_failures=_number(env, "FAULT_RENDER_FAILURES", 0),
            worker_heartbeat_s=_number(env, "WORKER_HEARTBEAT_S", 10),
            worker_dead_after_s=_number(env, "WORKER_DEAD_AFTER_S", 45),
            worker_stop_grace_s=_number(env, "WORKER_STOP_GRACE_S", 20.0, float),
            cjk_font_path=env.get("CJK_FONT_PATH") or None,
            support_refund_limit_fen=_number(env, "SUPPORT_REFUND_LIMIT_FEN", 990),
            console_secure_cookies=_flag(env, "CONSOLE_SECURE_COOKIES", True),
            console_session_ttl_s=_number(env, "CONSOLE_SESSION_TTL_S", 8 * 3600),
            console_login_max_failures=_number(env, "CONSOLE_LOGIN_MAX_FAILURES", 5),
            console_login_lockout_s=_number(env, "CONSOLE_LOGIN_LOCKOUT_S", 15 * 60),
            console_timezone=env.get("CONSOLE_TIMEZONE", "Asia/Shanghai"),
        )


def _persistent_secret(path: Path, size: int = 48) -> str:
    """A per-instance random key, so several processes of one deployment share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.urlsafe_b64encode(secrets.token_bytes(size)).decode())
    return path.read_text().strip()


def _master_key(encoded: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(encoded.encode())
    except ValueError as error:
        raise ConfigError("MASTER_KEY must be 32 bytes, urlsafe base64") from error
    if len(key) != 32:
        raise ConfigError("MASTER_KEY must be 32 bytes, urlsafe base64")
    return key


def _read_file(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error}") from error


def _number(env, name, default, kind=int):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError as error:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from error


def _flag(env, name, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _int_list(env, name, default):
    raw = env.get(name)
    if raw in (None, ""):
        return tuple(default)
    try:
        values = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError as error:
        raise ConfigError(f"{name} must be comma-separated whole seconds, got {raw!r}") from error
    if not values or min(values) < 0:
        raise ConfigError(f"{name} must be comma-separated whole seconds, got {raw!r}")
    return values


def _choice(env, name, default, allowed):
    value = env.get(name) or default
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


def _json(env, name, default):
    raw = env.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{name} must be JSON: {error}") from error
