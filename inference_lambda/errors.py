"""Typed API errors. Each becomes ``{"error": {"code", "message"}}`` with its status.

Image decoding errors come from :mod:`shared.imaging` and carry the same three attributes
(``code``, ``http_status``, ``message``), so the handler treats both alike.
"""

from __future__ import annotations


class ApiError(Exception):
    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    pass


class PayloadTooLarge(ApiError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ApiError):
    code = "unsupported_media_type"
    http_status = 415


class NotFound(ApiError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(ApiError):
    code = "method_not_allowed"
    http_status = 405


class ModelUnavailable(ApiError):
    """No model can be served right now; the client should retry after ``retry_after`` seconds."""

    code = "model_unavailable"
    http_status = 503

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = retry_after


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
