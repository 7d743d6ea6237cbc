"""Mini-program server APIs: code2session login, the access token, subscribe messages, unlimited wxacodes and the
phone number behind a getPhoneNumber code."""
from __future__ import annotations

import base64
import io
import secrets
import time

import qrcode
from flask import Blueprint, Response, request

from wechat_sim.simulator import current_simulator
from wechat_sim.web import json_response, mp_error, request_json

ACCESS_TOKEN_TTL_S = 7200
# A replaced token keeps working this long, as WeChat documents for token refreshes.
REPLACED_TOKEN_GRACE_S = 300

blueprint = Blueprint("miniprogram", __name__)


def _invalid_token(errcode: int) -> Response:
    return mp_error(errcode, "invalid credential, access_token is invalid or not latest")


@blueprint.get("/sns/jscode2session")
def jscode2session():
    sim = current_simulator()
    args = request.args
    if args.get("appid") != sim.creds.appid or args.get("secret") != sim.creds.app_secret:
        return mp_error(40125, "invalid appsecret")
    if args.get("grant_type") != "authorization_code":
        return mp_error(40002, "invalid grant_type")
    code = args.get("js_code", "")
    with sim.state.lock:
        entry = sim.state.login_codes.get(code)
        if not entry or entry["used"] or sim.login_code_expired(entry["issued_at"]):
            return mp_error(40029, "invalid code")
        entry["used"] = True
        openid = entry["openid"]
        session_key = base64.b64encode(secrets.token_bytes(16)).decode()
        sim.state.session_keys[openid] = session_key
    return json_response({"openid": openid, "session_key": session_key})


@blueprint.get("/cgi-bin/token")
def access_token():
    sim = current_simulator()
    args = request.args
    if args.get("grant_type") != "client_credential":
        return mp_error(40002, "invalid grant_type")
    if args.get("appid") != sim.creds.appid:
        return mp_error(40013, "invalid appid")
    if args.get("secret") != sim.creds.app_secret:
        return mp_error(40125, "invalid appsecret")
    token = secrets.token_urlsafe(96)
    now = time.time()
    state = sim.state
    with state.lock:
        for old in state.tokens:
            state.tokens[old] = min(state.tokens[old], now + REPLACED_TOKEN_GRACE_S)
        state.tokens[token] = now + ACCESS_TOKEN_TTL_S
        state.token_issued += 1
    return json_response({"access_token": token, "expires_in": ACCESS_TOKEN_TTL_S})


@blueprint.post("/cgi-bin/message/subscribe/send")
def subscribe_send():
    sim = current_simulator()
    ok, errcode = sim.token_valid(request.args.get("access_token"))
    if not ok:
        return _invalid_token(errcode)
    payload = request_json()
    if payload is None:
        return mp_error(47001, "data format error")
    touser, template_id = payload.get("touser"), payload.get("template_id")
    data = payload.get("data")
    state = sim.state
    with state.lock:
        if touser not in state.openid_by_user.values():
            return mp_error(40003, "invalid openid")
        if not template_id:
            return mp_error(40037, "invalid template_id")
        if not isinstance(data, dict) or not all(
                isinstance(value, dict) and isinstance(value.get("value"), str) for value in data.values()):
            return mp_error(47003, "argument invalid! data.value invalid")
        remaining = state.grants.get((touser, template_id), 0)
        if remaining <= 0:
            return mp_error(43101, "user refuse to accept the msg")
        state.grants[(touser, template_id)] = remaining - 1
        state.messages.append({"touser": touser, "template_id": template_id, "page": payload.get("page"),
                               "data": data, "sent_at": time.time()})
    return json_response({"errcode": 0, "errmsg": "ok", "msgid": secrets.randbelow(10**12)})


@blueprint.post("/wxa/getwxacodeunlimit")
def wxa_code_unlimited():
    ok, errcode = current_simulator().token_valid(request.args.get("access_token"))
    if not ok:
        return _invalid_token(errcode)
    payload = request_json()
    if payload is None or not isinstance(payload.get("scene"), str) or not payload["scene"]:
        return mp_error(47001, "data format error")
    scene, page = payload["scene"], payload.get("page") or ""
    if len(scene) > 32:
        return mp_error(40169, "invalid length for scene")
    if page.startswith("/"):
        return mp_error(41030, "invalid page")
    width = max(280, min(int(payload.get("width") or 430), 1280))
    image = qrcode.make(f"{page}?scene={scene}", border=4).get_image().convert("RGB")
    image = image.resize((width, width), resample=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Response(buffer.getvalue(), content_type="image/png")


@blueprint.post("/wxa/business/getuserphonenumber")
def user_phone_number():
    """A getPhoneNumber code (POST /sim/phone_code issues them) for the user's phone, once, within its lifetime."""
    sim = current_simulator()
    ok, errcode = sim.token_valid(request.args.get("access_token"))
    if not ok:
        return _invalid_token(errcode)
    payload = request_json()
    if payload is None or not isinstance(payload.get("code"), str) or not payload["code"]:
        return mp_error(47001, "data format error")
    with sim.state.lock:
        entry = sim.state.phone_codes.get(payload["code"])
        if not entry or entry["used"] or sim.phone_code_expired(entry["issued_at"]):
            return mp_error(40029, "invalid code")
        entry["used"] = True
        phone, country_code, appid = entry["phone"], entry["country_code"], entry["appid"]
    shown = phone if country_code == "86" else f"+{country_code} {phone}"
    return json_response({"errcode": 0, "errmsg": "ok", "phone_info": {
        "phoneNumber": shown, "purePhoneNumber": phone, "countryCode": country_code,
        "watermark": {"timestamp": int(time.time()), "appid": appid}}})
