"""The error envelope of the client contract: HTTP status + {"error": {code, message, details, request_id}}."""
from __future__ import annotations

from flask import jsonify
from werkzeug.exceptions import HTTPException

from portraits import errors as domain
from portraits import logs

# Each kind of domain refusal answers one status.
DOMAIN_STATUS = {
    domain.Invalid: 400,
    domain.Unauthenticated: 401,
    domain.PaymentRequired: 402,
    domain.Forbidden: 403,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.Gone: 410,
    domain.TooLarge: 413,
    domain.UnsupportedMedia: 415,
    domain.UpstreamFailed: 502,
    domain.Unavailable: 503,
}


def domain_status(error: domain.DomainError) -> int:
    return next(status for kind, status in DOMAIN_STATUS.items() if isinstance(error, kind))


class ApiError(Exception):
    """A refusal of the HTTP layer itself (a body that is not JSON, a missing header)."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def error_detail(code: str, message: str, details: dict | None = None) -> dict:
    """The envelope's `error` object; its request id is the one the response's X-Request-ID header carries."""
    request_id = logs.current_request_id() or logs.new_request_id()  # bound for every request (observability)
    return {"code": code, "message": message, "details": details or {}, "request_id": request_id}


def envelope(status: int, code: str, message: str, details: dict | None = None):
    response = jsonify({"error": error_detail(code, message, details)})
    response.status_code = status
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",  # a body without Content-Length read past its route's limit (miniapp_api.bodies)
    415: "unsupported_media_type",
}


def register_error_handlers(app) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return envelope(error.status, error.code, error.message, error.details)

    @app.errorhandler(domain.DomainError)
    def _domain_error(error: domain.DomainError):
        return envelope(domain_status(error), error.code, error.message, error.details)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        code = _HTTP_CODES.get(error.code, "http_error")
        response = envelope(error.code, code, error.description or error.name)
        for name, value in error.get_headers():  # Allow on a 405, Content-Range on a 416
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        app.logger.exception("unhandled error")
        return envelope(500, "internal_error", "Something went wrong on our side; nothing was charged twice.")
