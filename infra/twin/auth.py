"""The twin's credentials and the guard in front of its control plane.

Every start of the twin draws new credentials (:func:`new_credentials`); SeaweedFS gets them as
its only S3 identity and moto's server sits behind :func:`guarded`, which answers a request only
when it carries a valid AWS Signature Version 4 made with them. Neither server answers a browser:
a request with an ``Origin`` header (every cross-origin ``fetch`` and form post sends one) or a
CORS preflight is refused with 403 and no ``Access-Control-*`` header, so a web page open in the
operator's browser can neither read nor write the twin's S3 or its model pointer.
"""

from __future__ import annotations

import hmac
import io
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

SERVER_HEADER = "x-twin-server"  # names which of the twin's servers answered (for wrong-endpoint messages)
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
                   r"(?P<service>[^/]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;\-]+),\s*"
                   r"Signature=(?P<sig>[0-9a-f]{64})$")


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


def new_credentials() -> Credentials:
    """Random credentials: a 20-character key id (``TWIN`` + 16 hex upper case) and a 40-character secret."""
    return Credentials("TWIN" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)[:40])


_current: Credentials | None = None


def set_credentials(creds: Credentials) -> None:
    """The credentials this process's clients of the twin sign with (set by :class:`Twin` on start)."""
    global _current
    _current = creds


def current_credentials() -> Credentials:
    """The credentials set by :func:`set_credentials`; drawn once if none were set yet."""
    global _current
    if _current is None:
        _current = new_credentials()
    return _current


def _header(environ: dict[str, Any], name: str) -> str | None:
    if name == "content-type":
        return environ.get("CONTENT_TYPE")
    if name == "content-length":
        return environ.get("CONTENT_LENGTH")
    return environ.get("HTTP_" + name.upper().replace("-", "_"))


def signature_valid(environ: dict[str, Any], body: bytes, creds: Credentials) -> bool:
    """Whether the WSGI request carries a SigV4 ``Authorization`` header signed with ``creds``."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    m = _AUTH.match(environ.get("HTTP_AUTHORIZATION", "").strip())
    if m is None or not hmac.compare_digest(m["key"], creds.access_key_id):
        return False
    headers = {}
    for name in m["signed"].split(";"):
        value = _header(environ, name)
        if value is None:
            return False
        headers[name] = value
    stamp = headers.get("x-amz-date", "")
    if not stamp.startswith(m["date"]):
        return False
    query = environ.get("QUERY_STRING", "")
    url = f"http://{environ.get('HTTP_HOST', '')}{quote(environ.get('PATH_INFO', '/'), safe='/~')}" + (
        f"?{query}" if query else "")
    req = AWSRequest(method=environ.get("REQUEST_METHOD", "GET"), url=url, data=body, headers=headers)
    req.context["timestamp"] = stamp
    signer = SigV4Auth(BotoCredentials(creds.access_key_id, creds.secret_access_key), m["service"], m["region"])
    expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
    return hmac.compare_digest(expected, m["sig"])


def guarded(app: Callable, creds: Credentials, server_name: str) -> Callable:
    """WSGI middleware: refuse browser (``Origin``) requests and unsigned or wrongly signed ones
    with 403; strip any ``Access-Control-*`` header from what ``app`` answers; name the server in
    :data:`SERVER_HEADER`."""

    def refuse(start_response: Callable, code: str, message: str) -> Iterable[bytes]:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ErrorResponse><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error></ErrorResponse>").encode()
        start_response("403 Forbidden", [("Content-Type", "text/xml"), ("Content-Length", str(len(body))),
                                         (SERVER_HEADER, server_name)])
        return [body]

    def middleware(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("HTTP_ORIGIN") is not None or environ.get("REQUEST_METHOD") == "OPTIONS":
            return refuse(start_response, "AccessDenied", "the twin's servers do not answer browser requests")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if not signature_valid(environ, body, creds):
            return refuse(start_response, "InvalidClientTokenId",
                          "sign with the twin's credentials (its state folder's twin.json; they change at every start)")

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            kept = [(k, v) for k, v in headers if not k.lower().startswith("access-control-")]
            return start_response(status, [*kept, (SERVER_HEADER, server_name)], exc_info)

        return app(environ, start)

    return middleware
