"""The app's side of the mini-program server APIs, through wechatpy, pointed at a configurable base URL.

The access token lives in Redis (wechatpy's RedisStorage) so every web process and worker shares one token and the
daily issuance quota is not burnt per process.
"""
from __future__ import annotations

import threading
import time

import requests
from redis.exceptions import LockError
from wechatpy import WeChatClient
from wechatpy.exceptions import WeChatClientException
from wechatpy.session.redisstorage import RedisStorage

DEFAULT_API_BASE_URL = "https://api.weixin.qq.com"
# Give up on the cached token this long before WeChat does, so a call never goes out with a token about to die.
TOKEN_EXPIRY_MARGIN_S = 300
LOGIN_CODE_ERRORS = {40029, 40163, 40226}
MEDIA_CHECK_QUOTA_ERRORS = {45009, 45011}
MEDIA_TYPE_IMAGE = 2
SUBSCRIBE_REFUSALS = {43101, 40003, 40037, 47003, 41030}
# getuserphonenumber's errcodes that say the code itself is bad (invalid, used or expired); the others it
# documents (-1 system busy, 45011 over the per-minute quota, 40013 invalid appid) are WeChat's side or ours.
PHONE_CODE_ERRORS = {40029}
PHONE_NUMBER_PATH = "wxa/business/getuserphonenumber"


class WeChatLoginError(Exception):
    code = "invalid_login_code"

    def __init__(self, message: str = "the wx.login code is invalid, used or expired", errcode: int | None = None):
        super().__init__(message)
        self.errcode = errcode


class SubscribeRefused(Exception):
    """WeChat will not deliver this message (no remaining one-time grant, unknown openid or template, bad data)."""

    def __init__(self, errcode: int, message: str):
        super().__init__(f"{errcode}: {message}")
        self.errcode = errcode
        self.code = "subscribe_refused" if errcode == 43101 else "subscribe_rejected"


class PhoneCodeRefused(Exception):
    """The getPhoneNumber code is invalid, used or expired, or WeChat's answer was minted for another app."""

    code = "invalid_phone_code"

    def __init__(self, message: str, errcode: int | None = None):
        super().__init__(message)
        self.errcode = errcode


class WeChatUnavailable(Exception):
    """WeChat could not be reached or answered with an error that says nothing about the caller's input."""

    def __init__(self, message: str, errcode: int | None = None):
        super().__init__(message)
        self.errcode = errcode
        self.code = "wechat_unavailable"


class MediaCheckQuotaExhausted(Exception):
    """WeChat refused a mediaCheckAsync call for its quota: 45011 (this minute's) or 45009 (today's)."""

    def __init__(self, errcode: int):
        super().__init__(f"mediaCheckAsync quota exhausted ({errcode})")
        self.errcode = errcode
        self.code = "content_check_quota"


class _TimeoutSession(requests.Session):
    """wechatpy fetches the access token without a timeout; give every call one."""

    def __init__(self, timeout: float):
        super().__init__()
        self._default_timeout = timeout

    def request(self, method, url, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._default_timeout
        return super().request(method, url, **kwargs)


class _ConfigurableWeChatClient(WeChatClient):
    def __init__(self, *, appid, secret, api_base_url, storage, redis, timeout):
        super().__init__(appid, secret, session=storage, timeout=timeout)
        self._api_base_url = api_base_url
        self._redis = redis
        self._http = _TimeoutSession(timeout)
        self.API_BASE_URL = f"{api_base_url}/cgi-bin/"
        self.wxa.API_BASE_URL = f"{api_base_url}/"
        self._handed_out = threading.local()

    @property
    def access_token(self):
        token = self.session.get(self.access_token_key)
        if token and (not self.expires_at or self.expires_at - time.time() > 60):
            self._handed_out.token = token
            return token
        self._refresh_unless_replaced(stale=token)
        token = self.session.get(self.access_token_key)
        self._handed_out.token = token
        return token

    def fetch_access_token(self):
        # wechatpy calls this when WeChat rejects a token; the rejected one is the last this thread handed out.
        return self._refresh_unless_replaced(stale=getattr(self._handed_out, "token", None))

    def _refresh_unless_replaced(self, stale):
        """Refresh once for all processes: a token stored by someone else since `stale` was seen is reused.

        `stale` must be the token the caller judged unusable, read before deciding to refresh; reading it again
        here would take a token another process stored a moment ago for stale and issue a second one.
        """
        with self._redis.lock(f"wechatpy:{self.appid}:token-refresh", timeout=30, blocking_timeout=30):
            current = self.session.get(self.access_token_key)
            if current and current != stale:
                ttl = self._redis.ttl(self.session.key_name(self.access_token_key))
                self.expires_at = int(time.time()) + max(int(ttl), 0)
                return {"access_token": current}
            result = self._fetch_access_token(
                url=f"{self._api_base_url}/cgi-bin/token",
                params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
            )
            lifetime = max(int(result.get("expires_in", 7200)) - TOKEN_EXPIRY_MARGIN_S, 60)
            self.session.set(self.access_token_key, result["access_token"], lifetime)
            self.expires_at = int(time.time()) + lifetime
            return result


class WeChatGateway:
    def __init__(self, *, appid: str, secret: str, api_base_url: str | None, redis, timeout: float = 10.0):
        self._client = _ConfigurableWeChatClient(
            appid=appid, secret=secret, api_base_url=(api_base_url or DEFAULT_API_BASE_URL).rstrip("/"),
            storage=RedisStorage(redis, prefix="wechatpy"), redis=redis, timeout=timeout,
        )

    def _call(self, operation, *args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except WeChatClientException as error:
            if error.errcode is None:
                status = getattr(error.response, "status_code", None)
                raise WeChatUnavailable(f"WeChat answered HTTP {status}") from error
            raise
        except requests.RequestException as error:
            raise WeChatUnavailable(f"WeChat unreachable: {type(error).__name__}") from error
        except LockError as error:
            raise WeChatUnavailable("timed out waiting for another process to refresh the access token") from error

    def code_to_openid(self, code: str) -> str:
        return self.code_to_session(code)["openid"]

    def code_to_session(self, code: str) -> dict:
        """code2session: {"openid", "session_key"} (the session key signs wx.requestVirtualPayment)."""
        if not code or not isinstance(code, str):
            raise WeChatLoginError("a wx.login code is required")
        try:
            result = self._call(self._client.wxa.code_to_session, code)
        except WeChatClientException as error:
            if error.errcode in LOGIN_CODE_ERRORS:
                raise WeChatLoginError(errcode=error.errcode) from error
            raise WeChatUnavailable(f"code2session failed: {error.errcode} {error.errmsg}",
                                    errcode=error.errcode) from error
        openid = result.get("openid") if isinstance(result, dict) else None
        if not openid:
            raise WeChatUnavailable("code2session answered without an openid")
        return {"openid": openid, "session_key": result.get("session_key")}

    def access_token(self) -> str:
        """The shared access token, for the calls wechatpy has no method for (xpay)."""
        return self._call(lambda: self._client.access_token)

    def renew_access_token(self, rejected: str) -> str:
        """WeChat refused `rejected`: a fresh token (or the one another process stored meanwhile)."""
        self._call(self._client._refresh_unless_replaced, stale=rejected)
        return self.access_token()

    def send_subscribe_message(self, openid: str, template_id: str, data: dict, page: str | None) -> None:
        # WeChat wants every field as {"value": "..."}; accept plain values too.
        fields = {key: value if isinstance(value, dict) else {"value": str(value)} for key, value in data.items()}
        try:
            self._call(self._client.wxa.send_subscribe_message, openid, template_id, fields, page=page)
        except WeChatClientException as error:
            if error.errcode in SUBSCRIBE_REFUSALS:
                raise SubscribeRefused(error.errcode, str(error.errmsg)) from error
            raise WeChatUnavailable(f"subscribe send failed: {error.errcode} {error.errmsg}",
                                    errcode=error.errcode) from error

    def unlimited_wxa_code(self, scene: str, page: str, width: int = 430) -> bytes:
        try:
            result = self._call(self._client.wxa.get_wxa_code_unlimited, scene, width=width, page=page)
        except WeChatClientException as error:
            raise WeChatUnavailable(f"getwxacodeunlimit failed: {error.errcode} {error.errmsg}",
                                    errcode=error.errcode) from error
        # wechatpy hands back the raw response when the body is not JSON, which is the image.
        content = getattr(result, "content", None)
        if not content or not content.startswith((b"\x89PNG", b"\xff\xd8")):
            raise WeChatUnavailable("getwxacodeunlimit answered without an image")
        return content

    def user_phone_number(self, code: str) -> dict:
        """The phone number behind a getPhoneNumber button's code: {phone_number, pure_phone_number,
        country_code}. The answer's watermark must name this app. wechatpy 1.8 has no method for this API, so it
        goes through its private `_post` (README, upgrade checklist)."""
        if not code or not isinstance(code, str):
            raise PhoneCodeRefused("a getPhoneNumber code is required")
        try:
            result = self._call(self._client.wxa._post, PHONE_NUMBER_PATH, data={"code": code})
        except WeChatClientException as error:
            if error.errcode in PHONE_CODE_ERRORS:
                raise PhoneCodeRefused("the getPhoneNumber code is invalid, used or expired",
                                       errcode=error.errcode) from error
            raise WeChatUnavailable(f"getuserphonenumber failed: {error.errcode} {error.errmsg}",
                                    errcode=error.errcode) from error
        info = result.get("phone_info") if isinstance(result, dict) else None
        if not isinstance(info, dict) or not info.get("purePhoneNumber"):
            raise WeChatUnavailable("getuserphonenumber answered without a phone number")
        watermark = info.get("watermark") if isinstance(info.get("watermark"), dict) else {}
        if watermark.get("appid") != self._client.appid:
            raise PhoneCodeRefused("the phone number's watermark names another app")
        return {"phone_number": str(info.get("phoneNumber") or info["purePhoneNumber"]),
                "pure_phone_number": str(info["purePhoneNumber"]),
                "country_code": str(info.get("countryCode") or "")}

    def media_check_async(self, media_url: str, openid: str, scene: int) -> str:
        """Ask WeChat to check an image at media_url (security.mediaCheckAsync, version 2); its trace_id. The
        verdict arrives later as a `wxa_media_check` message push. wechatpy's check_media_async speaks version 1
        (no openid, no scene), so the call is made through the client's public post()."""
        data = {"media_url": media_url, "media_type": MEDIA_TYPE_IMAGE, "version": 2, "openid": openid,
                "scene": scene}
        try:
            result = self._call(self._client.post, "wxa/media_check_async", data=data,
                                api_base_url=self._client.wxa.API_BASE_URL)
        except WeChatClientException as error:
            if error.errcode in MEDIA_CHECK_QUOTA_ERRORS:
                raise MediaCheckQuotaExhausted(error.errcode) from error
            raise WeChatUnavailable(f"mediaCheckAsync failed: {error.errcode} {error.errmsg}",
                                    errcode=error.errcode) from error
        trace_id = result.get("trace_id") if isinstance(result, dict) else None
        if not trace_id:
            raise WeChatUnavailable("mediaCheckAsync answered without a trace_id")
        return trace_id
