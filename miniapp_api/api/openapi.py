"""The client contract as OpenAPI 3, served at /api/v1/openapi.json. Tests check it covers every route."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


S = {"type": "string"}
I = {"type": "integer"}
B = {"type": "boolean"}
N = {"type": "number"}
NULLABLE_N = {"type": "number", "nullable": True}

ERROR = _obj({"error": _obj({"code": S, "message": S, "details": {"type": "object"}}, ["code", "message"])}, ["error"])

QUEUE = _obj({"state": S, "position": I, "ahead": I, "eta_seconds": I, "progress": N, "step": I, "total": I})
POSITION = _obj({"position": I, "ahead": I, "eta_seconds": I, "running": B})
NULLABLE_S = {"type": "string", "nullable": True}
PHOTO = _obj({"id": S, "role": S, "accepted": B, "reasons": {"type": "array", "items": S}})
AVATAR = _obj({"id": S, "state": {"type": "string", "enum": ["collecting", "ready", "queued", "training", "trained",
                                                               "failed"]},
               "gender": S, "photos": {"type": "array", "items": PHOTO}, "accepted_count": I, "min_photos": I,
               "max_photos": I, "missing": {"type": "array", "items": S}, "order_id": NULLABLE_S,
               "photos_purged": B, "failure": NULLABLE_S, "queue": {**QUEUE, "nullable": True}})
PAY_PARAMS = _obj({k: S for k in ("appId", "timeStamp", "nonceStr", "package", "signType", "paySign")})
REFUND = _obj({"out_refund_no": S, "amount": I, "state": S, "reason": NULLABLE_S, "requested_at": NULLABLE_S})
ORDER = _obj({"id": S, "avatar_id": S, "sku": S, "amount": I,
              "state": {"type": "string", "enum": ["created", "paid", "fulfilled", "closed", "refunding", "refunded",
                                                   "refund_failed"]},
              "render_credits": I, "created_at": NULLABLE_S, "paid_at": NULLABLE_S,
              "refunds": {"type": "array", "items": REFUND}, "pay_params": PAY_PARAMS})
IMAGE = _obj({"id": S, "url": S, "poster_url": S, "likeness": NULLABLE_N, "content_id": S, "render_id": S,
              "width": I, "height": I})
RENDER = _obj({"id": S, "state": {"type": "string", "enum": ["queued", "rendering", "done", "failed"]},
               "avatar_id": S, "template_id": S, "parent_id": {"type": "string", "nullable": True},
               "likeness": NULLABLE_N, "parent_likeness": NULLABLE_N, "refinements_left": I,
               "images": {"type": "array", "items": IMAGE}, "queue": {**POSITION, "nullable": True}})
TEMPLATE = _obj({"id": S, "name": _obj({"zh": S, "en": S}), "category": S, "gender": S, "preview_url": S})
CONSENT_STATE = _obj({"face_processing": {"nullable": True, **_obj({"version": S, "given_at": S, "withdrawn_at": S,
                                                                     "current": B})}})


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok_status: str, ok: dict | None, *errors: str, ok_description: str = "OK") -> dict:
    responses = {ok_status: {"description": ok_description, **({} if ok is None else ok)}}
    for status in errors:
        responses[status] = {"description": "error envelope with a stable reason code", **_json(ERROR)}
    return responses


def _op(summary: str, responses: dict, body: dict | None = None, params: list | None = None, auth: bool = True,
        tag: str = "api") -> dict:
    op = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, **body}
    if params:
        op["parameters"] = params
    if not auth:
        op["security"] = []
    return op


def _path_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": S}


def _query(name: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": S}


def spec() -> dict:
    callback_body = {"content": {"application/json": {"schema": _obj({"id": S, "create_time": S, "event_type": S,
                                                                       "resource_type": S, "resource": {"type": "object"},
                                                                       "summary": S})}}}
    paths = {
        "/api/v1/auth/login": {"post": _op("exchange a wx.login code", _responses(
            "200", _json(_obj({"token": S, "expires_in": I, "user": _obj({"id": S, "consents": CONSENT_STATE})})),
            "400", "401", "415", "503"), _json(_obj({"code": S}, ["code"])), auth=False)},
        "/api/v1/consents": {
            "get": _op("current consent texts", _responses("200", _json({"type": "array", "items": _obj(
                {"kind": S, "version": S, "text": S})}), "401")),
            "post": _op("give face-processing consent", _responses("201", _json(CONSENT_STATE), "400", "401", "403",
                                                                  "409", "415"),
                        _json(_obj({"kind": S, "version": S, "age_14_or_over": B, "own_face": B},
                                   ["kind", "version", "age_14_or_over", "own_face"]))),
        },
        "/api/v1/consents/face_processing": {"delete": _op(
            "withdraw consent; deletes photos, avatars, weights, renders and images", _responses(
                "200", _json(_obj({"consents": CONSENT_STATE, "deleted": {"type": "object"}})), "401"))},
        "/api/v1/avatars": {"post": _op("start an avatar", _responses("201", _json(AVATAR), "400", "401", "403", "415"),
                                        _json(_obj({"gender": {"type": "string", "enum": ["female", "male"]}},
                                                   ["gender"])))},
        "/api/v1/avatars/{avatar_id}": {"get": _op("state, photo verdicts, queue", _responses(
            "200", _json(AVATAR), "401", "404"), params=[_path_id("avatar_id")])},
        "/api/v1/avatars/{avatar_id}/queue": {"get": _op("cheap poll, answered from Redis alone", _responses(
            "200", _json(QUEUE), "401", "404"), params=[_path_id("avatar_id")])},
        "/api/v1/avatars/{avatar_id}/photos": {"post": _op("upload one photo; judged on arrival", _responses(
            "201", _json(_obj({"id": S, "accepted": B, "reasons": {"type": "array", "items": S}, "role": S,
                               "avatar": AVATAR})), "400", "401", "403", "404", "409", "413", "415"),
            {"content": {"multipart/form-data": {"schema": _obj(
                {"photo": {"type": "string", "format": "binary"},
                 "role": {"type": "string", "enum": ["front", "extra"]}}, ["photo"])}}},
            params=[_path_id("avatar_id")])},
        "/api/v1/orders": {"post": _op("buy (WeChat Pay JSAPI prepay)", _responses(
            "201", _json(ORDER), "400", "401", "404", "409", "415", "502"),
            _json(_obj({"avatar_id": S, "sku": S}, ["avatar_id", "sku"])))},
        "/api/v1/orders/{order_id}": {"get": _op("order state", _responses("200", _json(ORDER), "401", "404"),
                                                 params=[_path_id("order_id")])},
        "/api/v1/pay/notify": {"post": _op("WeChat Pay v3 payment callback (signed, AES-256-GCM encrypted)",
                                           _responses("204", None, "400", "401", "404", ok_description="applied"),
                                           callback_body, auth=False, tag="wechatpay")},
        "/api/v1/pay/refund-notify": {"post": _op("WeChat Pay v3 refund callback", _responses(
            "204", None, "400", "401", "404", ok_description="applied"), callback_body, auth=False, tag="wechatpay")},
        "/api/v1/subscriptions": {"post": _op("report wx.requestSubscribeMessage grants", _responses(
            "200", _json(_obj({"subscriptions": {"type": "object", "additionalProperties": I}})), "400", "401", "415"),
            _json(_obj({"grants": {"type": "object", "additionalProperties": {"type": "string",
                                                                               "enum": ["accept", "reject"]}}},
                       ["grants"])))},
        "/api/v1/templates": {"get": _op("template catalog", _responses(
            "200", _json({"type": "array", "items": TEMPLATE}), "400", "401"),
            params=[_query("category"), _query("gender")])},
        "/api/v1/templates/{template_id}/preview": {"get": _op("template preview card", {
            "200": {"description": "PNG", "content": {"image/png": {}}},
            "404": {"description": "no such template", **_json(ERROR)}}, params=[_path_id("template_id")],
            auth=False)},
        "/api/v1/renders": {"post": _op("render a template (uses one render set)", _responses(
            "201", _json(RENDER), "400", "401", "402", "404", "409", "415"),
            _json(_obj({"avatar_id": S, "template_id": S}, ["avatar_id", "template_id"])))},
        "/api/v1/renders/{render_id}": {"get": _op("render results", _responses("200", _json(RENDER), "401", "404"),
                                                   params=[_path_id("render_id")])},
        "/api/v1/renders/{render_id}/more-like-me": {"post": _op("re-render closer to the user's face", _responses(
            "201", _json(RENDER), "401", "404", "409"), params=[_path_id("render_id")])},
        "/api/v1/images/{image_id}": {"get": _op("the labelled image (owner only)", {
            "200": {"description": "PNG with visible and metadata AI labels", "content": {"image/png": {}}},
            "401": {"description": "error", **_json(ERROR)}, "404": {"description": "error", **_json(ERROR)}},
            params=[_path_id("image_id")])},
        "/api/v1/images/{image_id}/poster": {"get": _op("share poster with a code back into the app", {
            "200": {"description": "750x1334 PNG", "content": {"image/png": {}}},
            "401": {"description": "error", **_json(ERROR)}, "404": {"description": "error", **_json(ERROR)}},
            params=[_path_id("image_id")])},
        "/api/v1/me/export": {"get": _op("everything held about me", _responses(
            "200", _json({"type": "object"}), "401"))},
        "/api/v1/me": {"delete": _op("delete me and everything mine", _responses(
            "202", _json(_obj({"deleted": B})), "401"))},
        "/api/v1/openapi.json": {"get": _op("this document", {"200": {"description": "OpenAPI 3",
                                                                     **_json({"type": "object"})}}, auth=False)},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "AI portrait mini-program API", "version": "1.0.0",
                 "description": "Times are ISO-8601 UTC; money is integer fen. Errors: HTTP status + "
                                "{error:{code, message, details}}. Any id of another user answers 404."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": ERROR, "Avatar": AVATAR, "Order": ORDER, "Render": RENDER,
                                   "Image": IMAGE, "Template": TEMPLATE, "Queue": QUEUE}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi_json():
    return spec()
