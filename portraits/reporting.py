"""Error reporting to Sentry, off unless SENTRY_DSN is set; nothing that identifies a user leaves the process.

Every event passes through `scrub_event` before it is sent: values under keys that name an identity or a credential
are replaced, and in every string WeChat openids, our user ids, bearer and signed tokens, and the user folder of a
blob key (`users/<uid>/...`) are masked. Frames carry no local variables (`include_local_variables=False`): they may
hold decrypted photos or data keys that no pattern recognises.
"""
from __future__ import annotations

import re
from typing import Any

import sentry_sdk

FILTERED = "[Filtered]"
# Keys whose values are dropped wherever they appear (request bodies, headers, extra, contexts), case-insensitive:
# any key containing one of the parts, and the exact keys (`code` is the wx.login code of a login body).
SENSITIVE_KEY_PARTS = ("openid", "unionid", "session_key", "user_id", "token", "authorization", "cookie", "secret",
                       "password", "api_key", "apiv3", "private_key", "master_key", "phone")
SENSITIVE_KEYS = {"uid", "owner", "code", "js_code"}
# (pattern, replacement) applied to every string of the event.
_ID_CHAR = "A-Za-z0-9_-"
SENSITIVE_PATTERNS = (
    (re.compile(r"users/[^/\s\"'?#]+"), f"users/{FILTERED}"),  # blob keys: users/<uid>/avatars/...
    (re.compile(r"(?i)\bbearer\s+[^\s\"',;]+"), f"Bearer {FILTERED}"),
    (re.compile(rf"eyJ[{_ID_CHAR}]*\.[{_ID_CHAR}]+\.[{_ID_CHAR}]+"), FILTERED),  # itsdangerous tokens, JWTs
    (re.compile(rf"(?<![{_ID_CHAR}])o[{_ID_CHAR}]{{27}}(?![{_ID_CHAR}])"), FILTERED),  # WeChat openids (28 chars)
    (re.compile(r"(?<![A-Za-z0-9_])u_[0-9a-f]{20}(?![0-9a-f])"), FILTERED),  # our user ids (portraits.users)
    (re.compile(r"(?<![0-9])1[3-9][0-9]{9}(?![0-9])"), FILTERED),  # mainland mobile numbers (portraits.identity)
)


def _sensitive_key(key: Any) -> bool:
    lowered = str(key).lower()
    return lowered in SENSITIVE_KEYS or any(part in lowered for part in SENSITIVE_KEY_PARTS)


def scrub_text(text: str) -> str:
    for pattern, replacement in SENSITIVE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {key: FILTERED if _sensitive_key(key) and value[key] not in (None, "") else scrub(value[key])
                for key in value}
    if isinstance(value, (list, tuple)):
        # headers arrive as [name, value] pairs
        if len(value) == 2 and isinstance(value[0], str) and _sensitive_key(value[0]):
            return [value[0], FILTERED]
        return [scrub(item) for item in value]
    return value


def scrub_event(event: dict, hint: dict | None = None) -> dict:
    """Sentry's before_send: the event with identities and credentials masked; the user context dropped."""
    event = {key: value for key, value in event.items() if key != "user"}
    return scrub(event)


def init_error_reporting(dsn: str, environment: str, integrations: list, transport=None) -> bool:
    """Start Sentry with the given integrations (Flask's in the web process, RQ's in workers); True if started.
    `transport` is for tests (one that keeps events in memory)."""
    if not dsn:
        return False
    sentry_sdk.init(dsn=dsn, environment=environment, integrations=integrations, before_send=scrub_event,
                    send_default_pii=False, include_local_variables=False, transport=transport)
    return True
