"""The client contract, generated: spectree turns the pydantic models of miniapp_api.schemas into the OpenAPI 3.1
document at /api/v1/openapi.json, and validates each request (before the handler) and response (after it).

A handler declares its route with `endpoint(...)`: the success statuses with their models, the refusals of its own,
whether it is public. Its request models are its `json`, `form` or `query` parameter annotations. The statuses any
route of its kind can answer are added here: 405 and 500 always, 401 unless public, 400 with a request model, 413
and 415 with a body. A request its models refuse is answered in the error envelope (requests.refusal).
"""
from __future__ import annotations

import threading
from typing import Iterable, get_type_hints

from flask import Blueprint, current_app, request
from spectree import Response, SecurityScheme, SpecTree
from spectree.models import SecuritySchemeData
from spectree.plugins.base import Context
from spectree.plugins.flask_plugin import FlaskPlugin

from miniapp_api import bodies
from miniapp_api.api.requests import refusal, require_json_object, require_multipart
from miniapp_api.schemas import ErrorEnvelope, OpenApiDocument

bp = Blueprint("contract", __name__, url_prefix="/api/v1")  # spectree leaves out endpoints named "openapi*"

MEANINGS = {
    400: "refused input: push_malformed, push_undecryptable (WeChat's message push), malformed_json, json_too_deep (details.max_depth), json_object_required, field_too_long "
         "(details.fields: {name: problem}), invalid_fields (details.fields: {name: problem}), or a reason of this "
         "route",
    401: "no valid identity: missing_token, invalid_token, token_expired; login: invalid_login_code; WeChat Pay "
         "callbacks: a signature, timestamp or body that cannot be trusted",
    402: "what was paid for is used up: no_render_credits",
    403: "not allowed before the user does something: phone_required (bind a phone: POST /api/v1/me/phone), "
         "consent_required, guardian_consent_required; WeChat's message "
         "push: push_signature_invalid, push_expired, push_replayed, push_encryption_required, "
         "push_msg_signature_invalid, push_appid_mismatch; media links: media_link_invalid, media_link_expired",
    404: "no such thing, or another user's (answered the same): <kind>_not_found; callbacks: unknown_order, "
         "unknown_refund",
    405: "this path does not take that method; the Allow header lists the ones it takes",
    409: "not possible in the current state",
    410: "it existed but is over for good: invite_expired, invite_closed (an album's invitation)",
    413: "too large: the body (body_too_large, details.max_bytes: MAX_JSON_BODY_BYTES, for a photo upload "
         "MAX_UPLOAD_BYTES plus its multipart framing), or the photo (file_too_large, too_many_pixels)",
    415: "json_required, multipart_required, or an image format we do not take (unsupported_format)",
    416: "the byte range asked for is outside the file",
    429: "rate_limited: too many of these requests from this user (or, before login, this address); the "
         "Retry-After header says in how many seconds to try again",
    500: "internal_error: a fault on our side; nothing was charged twice",
    502: "a provider failed the request (payment_unavailable); nothing happened, trying again may work",
    503: "cannot answer now (wechat_unavailable, avatar_busy; callbacks: order_busy); the same call may succeed later",
}
SIGNED = "signed"  # a body read by its signature check only
ALLOW = {"description": "the methods this path takes", "schema": {"type": "string"}}
RETRY_AFTER = {"description": "seconds until the request may be made again", "schema": {"type": "string"}}


class Answers(Response):
    """spectree's Response plus what it cannot say itself: PNG bodies, the Allow header of 405 and Retry-After of
    429. It lists only the statuses given (spectree would add its validation-error status to every route)."""

    def __init__(self, ok: dict, errors: dict, also_answers: dict[int, str] | None = None):
        self.media = {status: kind for status, kind in ok.items() if isinstance(kind, str)}
        self.other_media = dict(also_answers or {})
        models = {f"HTTP_{status}": None if isinstance(kind, str) else kind for status, kind in ok.items()}
        models |= {f"HTTP_{status}": (model, MEANINGS[status]) for status, model in sorted(errors.items())}
        super().__init__(**models)

    def add_model(self, code, model, replace=True, description=None):
        if replace:
            super().add_model(code, model, replace, description)

    def generate_spec(self, naming_strategy):
        spec = super().generate_spec(naming_strategy)
        for status, media in self.media.items():
            spec[str(status)]["content"] = {media: {}}
        for status, media in self.other_media.items():
            spec[str(status)].setdefault("content", {})[media] = {}
        if "405" in spec:
            spec["405"]["headers"] = {"Allow": ALLOW}
        if "429" in spec:
            spec["429"]["headers"] = {"Retry-After": RETRY_AFTER}
        return dict(sorted(spec.items()))


class ContractBroken(Exception):
    """A handler answered something its response model refuses."""


class ContractPlugin(FlaskPlugin):
    """spectree's Flask plugin. A response its model refuses is a bug of ours: under test it fails the request
    (500, logged with the reason); in production it is logged and sent as it is."""

    def request_validation(self, request, query, json, form, headers, cookies):
        if all(model is None for model in (query, json, form, headers, cookies)):  # spectree would parse them anyway
            request.context = Context(None, None, None, None, None)
            return
        super().request_validation(request, query, json, form, headers, cookies)

    def validate_response(self, resp, resp_model, skip_validation, force_resp_serialize):
        if skip_validation:  # spectree would read the body even then, which a streamed file cannot give
            return current_app.make_response(resp), None
        response, broken = super().validate_response(resp, resp_model, skip_validation, force_resp_serialize)
        if broken is None:
            return response, None
        problem = f"{request.method} {request.path} answered what its response model refuses: {broken}"
        if current_app.testing:
            raise ContractBroken(problem)
        current_app.logger.error(problem)
        return current_app.make_response(resp), None


contract = SpecTree(
    "flask", backend=ContractPlugin, mode="strict", annotations=True,
    title="AI portrait mini-program API", version="1.0.0",
    description="Times are ISO-8601 UTC; money is integer fen. Errors: HTTP status + {error:{code, message, details}} "
                "with a stable reason code. Any id of another user answers 404. Request bodies may carry fields "
                "not listed here; they are ignored.",
    security_schemes=[SecurityScheme(name="bearer", data=SecuritySchemeData(type="http", scheme="bearer"))],
    security={"bearer": []},
    naming_strategy=lambda model: model.__name__, nested_naming_strategy=lambda _parent, child: child,
    validation_error_status=400, validation_error_model=ErrorEnvelope,
)


# Request bodies a route also takes in another media type, by operation id: {media type: description}.
OTHER_REQUEST_MEDIA: dict[str, dict[str, str]] = {}


def endpoint(*, ok: dict, errors: Iterable[int] = (), public: bool = False, signed_body=None,
             error_model=ErrorEnvelope, rate_limit: str | None = None, also_accepts: dict[str, str] | None = None,
             also_answers: dict[int, str] | None = None):
    """Declare a route's contract. ok: {status: response model, schemas.PNG, or None for no body}; errors: the
    statuses of its own refusals; signed_body: a body verified by its signature before anything reads it, so it
    is documented, not validated (WeChat Pay's callbacks, WeChat's message push); also_accepts: other media types
    of that body, {media type: description} (the message push's XML); also_answers: {status: another media type
    its success may be answered in} (the message push's `success` beside virtual payment's JSON); rate_limit: the setting holding the route's
    rate limits (miniapp_api.throttle applies them; 429)."""

    def decorate(func):
        if also_accepts:
            OTHER_REQUEST_MEDIA[func.__name__] = dict(also_accepts)
        hints = get_type_hints(func)
        inputs = {name: hints[name] for name in ("json", "form", "query") if name in hints}
        statuses = {405, 500, *errors}
        if not public:
            statuses.add(401)  # missing_token, invalid_token, token_expired
        if inputs:
            statuses.add(400)  # what the models refuse
        if "json" in inputs or "form" in inputs or signed_body is not None:
            statuses.add(413)  # a body over MAX_CONTENT_LENGTH
        if "json" in inputs or "form" in inputs:
            statuses.add(415)  # json_required, multipart_required
        if rate_limit is not None:
            statuses.add(429)  # rate_limited
        binary = any(isinstance(kind, str) for kind in ok.values())
        validated = contract.validate(
            json=signed_body, resp=Answers(ok, dict.fromkeys(statuses, error_model), also_answers),
            security={} if public else None, before=_refuse_invalid(inputs), operation_id=func.__name__,
            skip_validation=signed_body is not None or binary)(func)
        validated.body_kind = (bodies.UPLOAD if "form" in inputs else bodies.JSON_BODY if "json" in inputs
                               else SIGNED if signed_body is not None else None)
        validated.rate_limit = rate_limit
        return validated

    return decorate


def _refuse_invalid(inputs: dict):
    """spectree's `before` hook: the request's shape first (415, malformed JSON), then what its models refused."""

    def before(req, resp, error, instance, adapter):
        if "json" in inputs:
            require_json_object()
        if "form" in inputs:
            require_multipart()
        if error is not None:
            name, model = next((name, model) for name, model in inputs.items() if model.__name__ == error.title)
            raise refusal(error, model, _submitted(name))

    return before


def _submitted(name: str) -> dict:
    if name == "json":
        return request.get_json(silent=True)
    if name == "form":
        return {**request.form.to_dict(), **request.files.to_dict()}
    return request.args.to_dict()


_generated = threading.Lock()


def document() -> dict:
    """The OpenAPI document, generated once (from the routes of the app serving it) and tidied."""
    with _generated:
        spec = contract.spec
        spec.pop("tags", None)
        for operations in spec["paths"].values():
            for operation in operations.values():
                for media, description in OTHER_REQUEST_MEDIA.get(operation.get("operationId"), {}).items():
                    operation["requestBody"]["content"][media] = {"schema": {"type": "string",
                                                                             "description": description}}
                for key in ("tags", "description", "parameters"):
                    if key in operation and not operation[key]:  # spectree writes them empty
                        del operation[key]
                for parameter in operation.get("parameters", []):
                    if parameter.get("description") == "":
                        del parameter["description"]
                    if parameter["schema"].pop("allowEmptyValue", False):  # spectree leaves it in the schema
                        parameter["allowEmptyValue"] = True
        return spec


@bp.get("/openapi.json")
@endpoint(ok={200: OpenApiDocument}, public=True)
def openapi_json():
    """This document."""
    return document()
