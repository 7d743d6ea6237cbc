"""Content security: security.mediaCheckAsync (version 2) and, under /sim/, the controls of its verdicts and pushes
(wechat_sim.media_checks does the work) and of the message push's configuration."""
from __future__ import annotations

import time
from dataclasses import asdict, replace

from flask import Blueprint, request

from wechat_sim.simulator import current_simulator
from wechat_sim.web import json_response, mp_error, request_json

blueprint = Blueprint("security", __name__)
MEDIA_TYPES = {1: "audio", 2: "image"}
SCENES = (1, 2, 3, 4)


@blueprint.post("/wxa/media_check_async")
def media_check_async():
    sim = current_simulator()
    ok, errcode = sim.token_valid(request.args.get("access_token"))
    if not ok:
        return mp_error(errcode, "invalid credential, access_token is invalid or not latest")
    payload = request_json()
    if payload is None:
        return mp_error(47001, "data format error")
    media_url, media_type = payload.get("media_url"), payload.get("media_type")
    openid, scene, version = payload.get("openid"), payload.get("scene"), payload.get("version")
    if version != 2:
        return mp_error(40097, "invalid args: version must be 2")
    if not isinstance(media_url, str) or not media_url.startswith(("http://", "https://")):
        return mp_error(40097, "invalid args: media_url")
    if media_type not in MEDIA_TYPES or scene not in SCENES:
        return mp_error(40097, "invalid args: media_type or scene")
    with sim.state.lock:
        known = openid in sim.state.openid_by_user.values()
    if not known:
        return mp_error(61010, "user is not visiting within 2 hours")
    refused = sim.media_checks.take_quota()
    if refused == 45011:
        return mp_error(45011, "api minute-quota reach limit  mustslower  retry next minute")
    if refused == 45009:
        return mp_error(45009, "reach max api daily quota limit")
    trace_id = sim.media_checks.accept(media_url, media_type, openid, scene)
    return json_response({"errcode": 0, "errmsg": "ok", "trace_id": trace_id})


# ------------------------------------------------------------------------------------------- controls


@blueprint.route("/sim/push-config", methods=["GET", "POST"])
def sim_push_config():
    """The message push as set in WeChat's console: {url, mode: plaintext|safe, data_format: json|xml}."""
    checks = current_simulator().media_checks
    if request.method == "POST":
        payload = request_json() or {}
        try:
            checks.configure_push(url=payload.get("url"), mode=payload.get("mode"),
                                  data_format=payload.get("data_format"))
        except ValueError as error:
            return json_response({"error": "bad_push_config", "message": str(error)}, 400)
    push = asdict(checks.push)
    return json_response({key: push[key] for key in ("url", "mode", "data_format")})


@blueprint.post("/sim/media-checks/config")
def sim_media_config():
    """Defaults for every check: suggest, label, delay_s, minute_limit, day_limit, push_retries,
    push_retry_interval_s, fetch_timeout_s."""
    try:
        return json_response(current_simulator().media_checks.configure(**(request_json() or {})))
    except (TypeError, ValueError) as error:
        return json_response({"error": "bad_media_config", "message": str(error)}, 400)


@blueprint.post("/sim/media-checks/rules")
def sim_media_rule():
    """A verdict rule, checked in the order added: {openid?, media_type?, suggest, label?, count? (checks it
    applies to; unset: all), hold? (push only on /sim/media-checks/deliver), lose? (never pushed), delay_s?,
    errcode? (a verdict WeChat could not reach)}."""
    try:
        return json_response(current_simulator().media_checks.add_rule(request_json() or {}))
    except ValueError as error:
        return json_response({"error": "bad_rule", "message": str(error)}, 400)


@blueprint.post("/sim/media-checks/flush")
def sim_media_flush():
    """Deliver every scheduled push now and wait for those under way; with {"include_held": true} held ones too,
    with {"trace_id": …} only that one."""
    payload = request_json() or {}
    outcomes = current_simulator().media_checks.flush(payload.get("trace_id"), bool(payload.get("include_held")))
    return json_response({"delivered": len(outcomes), "deliveries": outcomes})


@blueprint.post("/sim/media-checks/forge")
def sim_media_forge():
    """Push a wxa_media_check event the way a forger (or a replay) would: {trace_id, suggest, token?, aes_key?,
    appid?, mode?, timestamp?, nonce?} — signed with the given (wrong) Token or EncodingAESKey, encrypted for the
    given appid, or dated `timestamp`. Answers what the push URL answered."""
    sim = current_simulator()
    checks = sim.media_checks
    payload = request_json() or {}
    check = {"trace_id": payload.get("trace_id") or "forged", "openid": payload.get("openid") or "o-forger",
             "suggest": payload.get("suggest") or "pass", "label": payload.get("label") or 100,
             "errcode": 0, "fetch": {"error": None}}
    message = checks.event(check)
    config = replace(checks.push, **{key: payload[key] for key in ("token", "aes_key", "mode")
                                     if payload.get(key)})
    appid = payload.get("appid")
    if appid:
        message["appid"] = appid
    outcome = checks.post(message, config, appid=appid, timestamp=payload.get("timestamp"),
                          nonce=payload.get("nonce"))
    return json_response({**outcome, "message": message, "sent_at": time.time()})


@blueprint.get("/sim/media-checks")
def sim_media_checks():
    return json_response(current_simulator().media_checks.view())


@blueprint.get("/sim/media-checks/stats")
def sim_media_stats():
    return json_response(current_simulator().media_checks.stats())
