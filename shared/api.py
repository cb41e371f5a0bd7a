"""The HTTP API contract, defined once: read by the handler (``inference_lambda.app``), the CDK
serving construct (``infra.constructs.serving``) and the local twin's gateway (``infra.twin.gateway``).

- routes and their methods; ``POST /predict`` needs the API key header;
- the media types ``POST /predict`` accepts; every one that is not text is a *binary media type*
  of the REST API, so API Gateway hands its body to the function base64-encoded instead of
  decoding it as UTF-8 text (which destroys image bytes);
- the stage name in the cloud URL;
- CORS: allowed headers, methods, preflight cache time, and how one ``Access-Control-Allow-Origin``
  value is chosen from several allowed origins.
"""

from __future__ import annotations

from .imaging import SUPPORTED_MEDIA_TYPES

STAGE_NAME = "prod"
ROUTES: dict[str, tuple[str, ...]] = {"/": ("GET",), "/health": ("GET",), "/predict": ("POST",)}
KEY_REQUIRED = {("POST", "/predict")}
API_KEY_HEADER = "X-Api-Key"

IMAGE_MEDIA_TYPES: tuple[str, ...] = SUPPORTED_MEDIA_TYPES  # image/jpeg, image/jpg, image/pjpeg, ...
JSON_MEDIA_TYPE = "application/json"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
ACCEPTED_MEDIA_TYPES: tuple[str, ...] = (*IMAGE_MEDIA_TYPES, JSON_MEDIA_TYPE, MULTIPART_MEDIA_TYPE)
# The DICOM answers' media type (inference_lambda/dicom_results.py) besides application/dicom.
DICOM_MULTIPART_MEDIA_TYPE = "multipart/related"
# Everything accepted except JSON, which is text, and the DICOM answers: API Gateway passes a
# base64 response body on as binary when the request's Accept names one of these.
BINARY_MEDIA_TYPES: list[str] = [*IMAGE_MEDIA_TYPES, MULTIPART_MEDIA_TYPE, DICOM_MULTIPART_MEDIA_TYPE]

CORS_ALLOW_HEADERS: tuple[str, ...] = ("Content-Type", API_KEY_HEADER)
CORS_ALLOW_METHODS: tuple[str, ...] = ("GET", "POST", "OPTIONS")
CORS_MAX_AGE_SECONDS = 600
ANY_ORIGIN = "*"


def cors_allow_origin(request_origin: str | None, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for a request from ``request_origin``.

    ``*`` only when ``allowed`` is exactly ``["*"]`` (or empty); otherwise the request's origin
    when it is one of ``allowed`` (compared without a trailing slash, case-insensitively), else
    None (the header is left out and the browser blocks the response). A configured origin is
    never widened to ``*``.
    """
    origins = [o.strip().rstrip("/") for o in allowed if o and o.strip()]
    if not origins or origins == [ANY_ORIGIN]:
        return ANY_ORIGIN
    if request_origin:
        wanted = request_origin.strip().rstrip("/").lower()
        for origin in origins:
            if origin != ANY_ORIGIN and origin.lower() == wanted:
                return origin
    return None


def parse_origins(value: str | None) -> list[str]:
    """A comma-separated origin list (an environment variable) -> origins; empty means ``["*"]``."""
    origins = [o.strip() for o in (value or "").split(",") if o.strip()]
    return origins or [ANY_ORIGIN]


def is_binary_media_type(content_type: str | None) -> bool:
    """Whether API Gateway delivers a body of this Content-Type base64-encoded (parameters ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return bool(media) and media in BINARY_MEDIA_TYPES
