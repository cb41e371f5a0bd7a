"""Request body -> image bytes, for the three ways ``POST /predict`` accepts an image.

Limits. A synchronous Lambda invocation carries at most 6 MB of event (API Gateway REST would
take 10 MB, but the Lambda limit is the one that binds), and API Gateway base64-encodes binary
bodies, which grows them by a third. So the largest image that can actually arrive is about
4.7 MB; the limit is 4.5 MB (:data:`MAX_IMAGE_BYTES`), whose base64 form (6,000,000 characters)
leaves room for headers, request context and multipart or JSON framing. Two checks enforce it:
the body as delivered (:data:`MAX_BODY_BYTES`, before anything is decoded) and the image bytes
after base64, JSON or multipart decoding. Both answer 413.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import multipart
import pybase64  # SIMD base64: decoding a 300 KB body takes 15 us instead of 0.6 ms

from shared.api import ACCEPTED_MEDIA_TYPES, JSON_MEDIA_TYPE, MULTIPART_MEDIA_TYPE
from shared.imaging import FILE_EXTENSIONS, media_type_format

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MAX_IMAGE_BYTES = 4_500_000
MAX_BODY_BYTES = 6 * 1024 * 1024
JSON_TYPES = (JSON_MEDIA_TYPE,)
MULTIPART_TYPE = MULTIPART_MEDIA_TYPE
ACCEPTED_TYPES = ACCEPTED_MEDIA_TYPES
FILE_FIELD = "file"
JSON_FIELD = "image_base64"
_MAX_MULTIPART_PARTS = 16
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ImagePayload:
    data: bytes
    declared_format: str | None  # "jpeg" | "png" | "dicom" | None: a hint for shared.imaging.decode_image
    kind: str  # "raw" | "json" | "multipart", for logs and metrics


def _too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{what} is {size:,} bytes, over the limit of {limit:,} bytes; downscale the image or send it "
        "as JPEG or PNG"
    )


def printable(text: str) -> str:
    """The user's own text, quoted back without control characters or quotes."""
    return "".join(ch if ch.isprintable() and ch not in "'\"" else "?" for ch in text)


def _unsupported(content_type: str | None) -> UnsupportedMediaType:
    said = (f"Content-Type '{printable(content_type[:100])}' is not accepted" if content_type
            else "the Content-Type header is missing")
    return UnsupportedMediaType(
        f"{said}; send {', '.join(('image/jpeg', 'image/png', 'application/dicom'))} bytes, "
        f"application/json with an '{JSON_FIELD}' field, or multipart/form-data with a '{FILE_FIELD}' field"
    )


def body_bytes(body: str | None, is_base64: bool) -> bytes:
    """The request body as bytes, as API Gateway delivered it (base64 for binary media types)."""
    if not body:
        raise BadRequest("the request body is empty; send an X-ray image", code="empty_body")
    if len(body) > MAX_BODY_BYTES:
        raise _too_large("the request body", len(body), MAX_BODY_BYTES)
    if not is_base64:
        # Text bodies: anything that was not valid UTF-8 on the wire arrives as surrogate escapes.
        return body.encode("utf-8", "surrogateescape")
    try:
        return pybase64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the request body is marked base64-encoded but is not valid base64",
                         code="invalid_base64") from None


def extract_image(body: str | None, is_base64: bool, content_type: str | None) -> ImagePayload:
    """Find the image in a ``POST /predict`` body; raise an :class:`~inference_lambda.errors.ApiError`."""
    raw = body_bytes(body, is_base64)
    if not raw:
        raise BadRequest("the request body is empty; send an X-ray image", code="empty_body")
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if not base:
        raise _unsupported(None)
    fmt = media_type_format(base)
    if fmt is not None:
        if len(raw) > MAX_IMAGE_BYTES:
            raise _too_large("the image", len(raw), MAX_IMAGE_BYTES)
        return ImagePayload(raw, fmt, "raw")
    if base in JSON_TYPES:
        return _from_json(raw)
    if base == MULTIPART_TYPE:
        return _from_multipart(raw, content_type or "")
    raise _unsupported(content_type)


def _from_json(raw: bytes) -> ImagePayload:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an integer past Python's digit limit, deep nesting
        raise BadRequest(f"the body is not valid JSON; send {{\"{JSON_FIELD}\": \"<base64 of the image>\"}}",
                         code="invalid_json") from None
    value = doc.get(JSON_FIELD) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise BadRequest(f"the JSON body has no '{JSON_FIELD}' string; send "
                         f"{{\"{JSON_FIELD}\": \"<base64 of the image>\"}}", code="missing_image_base64")
    declared = None
    m = _DATA_URL.match(value)
    if m:  # a browser's FileReader.readAsDataURL() result
        declared = media_type_format(m.group(1))
        value = value[m.end():]
    text = _WHITESPACE.sub(b"", value.encode("ascii", "replace"))
    # Reject before decoding: base64 is 4 characters for every 3 bytes.
    if len(text) // 4 * 3 > MAX_IMAGE_BYTES + 2:
        raise _too_large("the image", len(text) // 4 * 3, MAX_IMAGE_BYTES)
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{JSON_FIELD}' is not valid base64", code="invalid_base64") from None
    if not data:
        raise BadRequest(f"'{JSON_FIELD}' is empty; send the image's bytes base64-encoded", code="empty_image")
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large("the image", len(data), MAX_IMAGE_BYTES)
    return ImagePayload(data, declared, "json")


def _from_multipart(raw: bytes, content_type: str) -> ImagePayload:
    _, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter", code="invalid_multipart")
    found: bytearray | None = None
    segment = None
    collecting = False
    try:
        parser = multipart.PushMultipartParser(boundary, content_length=len(raw),
                                               max_segment_count=_MAX_MULTIPART_PARTS)
        # An empty chunk marks the end of input, so an unterminated stream fails instead of passing.
        for chunk in (raw, b""):
            for event in parser.parse(chunk):
                if isinstance(event, multipart.MultipartSegment):
                    collecting = event.name == FILE_FIELD and found is None
                    if collecting:
                        segment, found = event, bytearray()
                elif event is None:
                    collecting = False
                elif collecting and found is not None:
                    found += event
    except multipart.MultipartError as exc:
        # The parser's own sentence only: its extra arguments may carry undecodable header bytes.
        reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "unreadable"
        raise BadRequest(f"the multipart/form-data body is malformed ({reason})", code="invalid_multipart") from None
    if found is None or segment is None:
        raise BadRequest(f"the multipart form has no '{FILE_FIELD}' field; send the image as "
                         f"-F {FILE_FIELD}=@xray.jpeg", code="missing_file_field")
    if len(found) > MAX_IMAGE_BYTES:
        raise _too_large("the image", len(found), MAX_IMAGE_BYTES)
    declared = media_type_format(segment.content_type)
    if declared is None and segment.filename:
        declared = FILE_EXTENSIONS.get(PurePosixPath(segment.filename).suffix.lower())
    return ImagePayload(bytes(found), declared, "multipart")
