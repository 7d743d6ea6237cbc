"""Request helpers shared by the blueprints: services of this app, strict JSON bodies, owned lookups."""
from __future__ import annotations

from flask import current_app, g, request

from miniapp_api.errors import ApiError
from portraits.errors import not_found


def services():
    return current_app.extensions["portraits"]


def json_body(fields: dict[str, type | tuple], optional: dict[str, type | tuple] | None = None) -> dict:
    """Parse a JSON object and check each named field's type; unknown fields are ignored."""
    if not request.is_json:
        raise ApiError(415, "json_required", "Send Content-Type: application/json.")
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "malformed_json", "The body is not valid JSON.")
    if not isinstance(body, dict):
        raise ApiError(400, "json_object_required", "The body must be a JSON object.")
    problems = {}
    for name, kind in fields.items():
        if name not in body:
            problems[name] = "missing"
        elif not _is(body[name], kind):
            problems[name] = f"must be {_kind_name(kind)}"
    for name, kind in (optional or {}).items():
        if name in body and not _is(body[name], kind):
            problems[name] = f"must be {_kind_name(kind)}"
    if problems:
        raise ApiError(400, "invalid_fields", "Some fields are missing or have the wrong type.", {"fields": problems})
    return body


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if isinstance(value, str) and str in kinds and not value.strip():
        return False
    return isinstance(value, kinds)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a non-empty string", bool: "true or false", int: "an integer", dict: "an object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def owned(collection: str, doc_id: str, kind: str) -> dict:
    """A document of the current user; anyone else's id answers 404 exactly like a missing one."""
    doc = services().db[collection].find_one({"_id": doc_id, "user_id": g.user["_id"]})
    if doc is None:
        raise not_found(kind)
    return doc
