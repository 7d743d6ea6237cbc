"""Request helpers shared by the blueprints: services of this app, refusing a request its models do not accept
(in the error envelope), owned lookups."""
from __future__ import annotations

import functools

from flask import current_app, g, request
from pydantic import BaseModel, ValidationError

from miniapp_api.errors import ApiError
from miniapp_api.schemas import Refused
from portraits.errors import not_found


def services():
    return current_app.extensions["portraits"]


def require_json_object() -> dict:
    """The body as a JSON object, or the refusal saying why it is not one."""
    if not request.is_json:
        raise ApiError(415, "json_required", "Send Content-Type: application/json.")
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "malformed_json", "The body is not valid JSON.")
    if not isinstance(body, dict):
        raise ApiError(400, "json_object_required", "The body must be a JSON object.")
    return body


def require_multipart() -> None:
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "multipart_required", "Upload the photo as multipart/form-data, field 'photo'.")


def refusal(error: ValidationError, model: type[BaseModel], data: dict) -> ApiError:
    """What a request model's validation error answers: 400 invalid_fields with {"fields": {name: problem}}, unless
    every problem is one its field refuses with a reason code of its own (schemas.Refused)."""
    problems, refused, too_long = {}, [], {}
    for item in error.errors(include_url=False):
        name = str(item["loc"][0])
        if item["type"] == "string_too_long" and len(item["loc"]) == 1:
            too_long[name] = f"at most {item['ctx']['max_length']} characters"
            continue
        rule = _refused(model, name)
        if rule is not None and rule.covers(item):
            refused.append((name, rule))
        else:
            problems[name] = _problem(model, name, item)
    if too_long:
        return ApiError(400, "field_too_long", "Some fields are longer than allowed.", {"fields": too_long})
    if problems or not refused:
        return ApiError(400, "invalid_fields", "Some fields are missing or have the wrong type.", {"fields": problems})
    name, rule = refused[0]
    return ApiError(400, rule.code, rule.message, rule.details(data.get(name)))


_MUST_BE = {"string": "must be a non-empty string", "boolean": "must be true or false", "integer": "must be an integer",
            "number": "must be a number", "object": "must be an object", "array": "must be a list"}


def _problem(model: type[BaseModel], name: str, item: dict) -> str:
    if item["type"] == "missing":
        return "missing"
    if item["type"] == "not_one_of" and len(item["loc"]) == 1:
        return item["ctx"]["expected"]  # "female|male"
    return _MUST_BE.get(_properties(model).get(name, {}).get("type"), "is not valid")


def _refused(model: type[BaseModel], name: str) -> Refused | None:
    info = model.model_fields.get(name)
    return next((m for m in info.metadata if isinstance(m, Refused)), None) if info else None


@functools.cache
def _properties(model: type[BaseModel]) -> dict:
    return model.model_json_schema()["properties"]


def owned(collection: str, doc_id: str, kind: str) -> dict:
    """A document of the current user; anyone else's id answers 404 exactly like a missing one."""
    doc = services().db[collection].find_one({"_id": doc_id, "user_id": g.user["_id"]})
    if doc is None:
        raise not_found(kind)
    return doc
