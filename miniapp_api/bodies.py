"""Request bodies at the edge: a size limit per route, decided before anything reads the body, and a nesting limit
on JSON bodies, both answered in the error envelope before any expensive work.

A photo upload may be MAX_UPLOAD_BYTES (plus its multipart framing); every other body MAX_JSON_BODY_BYTES. A body
whose Content-Length is over its route's limit is refused unread; one sent without Content-Length (chunked) is
read up to one byte past the limit, never further, and refused if it got there.
"""
from __future__ import annotations

import json

from flask import current_app, request

from miniapp_api.api.requests import services
from miniapp_api.errors import ApiError

# Multipart framing and the `role` field around the photo itself.
UPLOAD_FRAMING_BYTES = 256 * 1024
# What `endpoint(...)` marks a view with: the kind of body it reads.
UPLOAD, JSON_BODY = "upload", "json"


def init_app(app) -> None:
    app.config["MAX_CONTENT_LENGTH"] = app.extensions["portraits"].settings.max_json_body_bytes
    app.before_request(_limit_body)


def body_limit(settings, body_kind: str | None) -> int:
    if body_kind == UPLOAD:
        return settings.max_upload_bytes + UPLOAD_FRAMING_BYTES
    return settings.max_json_body_bytes


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", "The request body is over the size limit.", {"max_bytes": limit})


def _limit_body() -> None:
    settings = services().settings
    body_kind = getattr(current_app.view_functions.get(request.endpoint), "body_kind", None)
    limit = body_limit(settings, body_kind)
    chunked = request.content_length is None
    # werkzeug stops reading a body without Content-Length at max_content_length, cutting it short without a
    # word: one byte more than the limit tells an overlong body from one that fits.
    request.max_content_length = limit + 1 if chunked else limit
    if body_kind is None:
        return  # the view never reads a body
    if not chunked and request.content_length > limit:
        raise body_too_large(limit)
    if chunked and len(request.get_data(cache=True)) > limit:
        raise body_too_large(limit)
    if body_kind == JSON_BODY and request.is_json:
        check_json_depth(request.get_data(cache=True), settings.max_json_depth)


def check_json_depth(data: bytes, max_depth: int) -> None:
    """Refuse JSON nested deeper than max_depth. Malformed JSON is left to the route's own parsing
    (malformed_json)."""
    try:
        parsed = json.loads(data)
    except RecursionError:  # deeper than the parser itself goes
        raise json_too_deep(max_depth) from None
    except ValueError:
        return
    if nesting_depth(parsed) > max_depth:
        raise json_too_deep(max_depth)


def json_too_deep(max_depth: int) -> ApiError:
    return ApiError(400, "json_too_deep", "The JSON body is nested too deeply.", {"max_depth": max_depth})


def nesting_depth(value) -> int:
    """How many arrays and objects deep a parsed JSON value goes (a scalar: 0), without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest
