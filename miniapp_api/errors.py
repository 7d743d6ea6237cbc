"""The error envelope of the client contract: HTTP status + {"error": {code, message, details}}."""
from __future__ import annotations

from flask import jsonify
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def not_found(kind: str) -> ApiError:
    """Ids of other users answer exactly like ids that never existed."""
    return ApiError(404, f"{kind}_not_found", f"No such {kind}.")


def envelope(status: int, code: str, message: str, details: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "file_too_large",
    415: "unsupported_media_type",
}


def register_error_handlers(app) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return envelope(error.status, error.code, error.message, error.details)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        code = _HTTP_CODES.get(error.code, "http_error")
        return envelope(error.code, code, error.description or error.name)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        app.logger.exception("unhandled error")
        return envelope(500, "internal_error", "Something went wrong on our side; nothing was charged twice.")
