"""A local API Gateway in front of the inference Lambda's handler.

It does what the stack's REST API does (``infra/constructs/serving.py``), on 127.0.0.1:

- resources ``GET /``, ``GET /health`` and ``POST /predict`` (the last needs the API key in
  ``x-api-key``), CORS preflight on each; any other method or path gets API Gateway's 403
  "Missing Authentication Token". The ``/prod`` stage prefix of the cloud URL is accepted too;
- each request becomes a REST API (v1) proxy event: headers and multi-value headers, query
  parameters, the body base64-encoded with ``isBase64Encoded`` when its content type is one of the
  API's binary media types; the handler's response comes back as the HTTP response;
- every error it answers itself is JSON in the stack's gateway-response shape
  ``{"message", "error": {"code", "message"}}``, also for requests it cannot parse;
- the function runs in Lambda execution environments (:mod:`infra.twin.lambda_pool`).

The HTTP server is uvicorn (an asyncio ASGI server on the h11 parser), with these limits
(:class:`Limits`; API Gateway's own figures where it publishes them):

- request line plus header values: 10,240 bytes, API Gateway's quota for REST APIs ("total
  combined size of request line and header values"); beyond it 414 ``URI_TOO_LONG`` when the
  request line alone is too long, else 431 ``REQUEST_HEADER_FIELDS_TOO_LARGE``. The parser buffers
  at most 16 KiB of an unfinished head;
- payload: 10 MB (API Gateway's limit), 413 ``REQUEST_TOO_LARGE``;
- the request head must arrive within 10 s of its first byte (or of the connection opening) and
  the body within 30 s of the head, counted from the start, not from the last byte: a client
  that trickles bytes cannot hold a connection; then 408 ``REQUEST_TIMEOUT`` and the connection
  closes. An idle keep-alive connection is closed after 60 s;
- open connections: 1,000; each further connection is answered 503 ``TOO_MANY_CONNECTIONS`` and
  closed (never reset). Requests waiting for or running in the function: 128; beyond that 429
  ``THROTTLED`` with ``Retry-After``, as API Gateway throttles;
- stopping lets requests in flight finish (up to the integration timeout) before the execution
  environments stop.

The access log (``access.log``, rotated) has one line per answer: time, client address, request
id, the method if it is one API Gateway knows, the resource if it is one of the API's, status,
bytes, latency, and the allowlisted header values (media type, content length, a cut user
agent). Never a body, a query string, an unknown path or bytes the parser could not read.

Usage plans (throttling per key, quotas) are not emulated.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.api import (
    BINARY_MEDIA_TYPES,
    CORS_ALLOW_HEADERS,
    CORS_ALLOW_METHODS,
    CORS_MAX_AGE_SECONDS,
    STAGE_NAME,
    cors_allow_origin,
)
from shared.api import KEY_REQUIRED as _KEY_REQUIRED
from shared.api import ROUTES as _ROUTES

from ..config import ROOT
from .lambda_pool import LambdaError, LambdaPool, close_logger, rotating_logger
from .processes import LOOPBACK, wait_until

LOG = logging.getLogger("cxr.twin.gateway")

STAGE = STAGE_NAME
# (method, resource) pairs the REST API defines; POST /predict needs the API key.
ROUTES = {(m, path) for path, methods in _ROUTES.items() for m in methods}
KEY_REQUIRED = set(_KEY_REQUIRED)
RESOURCES = {r for _, r in ROUTES}
# Methods API Gateway accepts on a resource; anything else (TRACE, CONNECT, WebDAV's, lowercase) is refused.
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
MAX_PAYLOAD = 10 * 1024 * 1024  # API Gateway's request payload limit
INTEGRATION_TIMEOUT = 29.0
API_KEY_ID = "twinkey"
# After refusing a request mid-stream, what is still read (and dropped) before the connection closes.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What the local API accepts; see the module's docstring for where each figure comes from."""

    max_head_bytes: int = 10_240  # request line + header values
    max_buffered_head: int = 16_384  # what the parser holds of an unfinished head
    max_payload: int = MAX_PAYLOAD
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: int = 60
    max_connections: int = 1000
    max_in_flight: int = 128
    graceful_seconds: float = INTEGRATION_TIMEOUT + 1.0


def is_binary(content_type: str | None, types: list[str]) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media:
        return False
    for t in types:
        t = t.lower()
        if t == media or t == "*/*" or (t.endswith("/*") and media.startswith(t[:-1])):
            return True
    return False


def gateway_error(code: str, message: str) -> bytes:
    return json.dumps({"message": message, "error": {"code": code, "message": message}}).encode()


# Answers the server gives before (or instead of) a parsed request: status, reason, code, message.
PROTOCOL_ERRORS = {
    400: ("Bad Request", "BAD_REQUEST", "Malformed HTTP request"),
    408: ("Request Timeout", "REQUEST_TIMEOUT", "The request did not arrive in time"),
    414: ("URI Too Long", "URI_TOO_LONG", "Request-URI Too Long"),
    431: ("Request Header Fields Too Large", "REQUEST_HEADER_FIELDS_TOO_LARGE", "Request Header Fields Too Large"),
}


def raw_error_response(status: int) -> bytes:
    reason, code, message = PROTOCOL_ERRORS[status]
    body = gateway_error(code, message)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-amzn-ErrorType: {code}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


_SAFE = re.compile(r"[^A-Za-z0-9 ._/;=+\-()]")


def _safe(value: str | None, limit: int) -> str:
    """An allowlisted header value for the access log: printable, quoted-safe, cut."""
    return _SAFE.sub("?", (value or "")[:limit]) or "-"


# -- HTTP protocol: uvicorn's h11 protocol with deadlines, limits and JSON errors ------------------


class _Protocol(H11Protocol):
    """One connection. Adds to uvicorn's: deadlines for the head and the body, a connection limit
    answered with JSON, and JSON (not text) for requests the parser refuses."""

    limits: Limits = Limits()
    access: logging.Logger = logging.getLogger("cxr.twin.access")
    too_many_connections: Any = None  # the ASGI app that answers every request on a connection over the limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind = ""
        self._head_bytes = 0
        self._line_seen = False
        self._lingering = False
        self._dropped = 0

    # deadlines ---------------------------------------------------------------------------------

    def _arm(self, kind: str, seconds: float) -> None:
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_kind = ""

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self._refuse(408)
        else:
            self.transport.close()

    def _refuse(self, status: int) -> None:
        """Answer ``status`` with a JSON body straight on the wire and close the connection."""
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's response, if any, is dropped
        self.transport.write(raw_error_response(status))
        # Lingering close: stop answering but read (and drop) what the client is still sending for a
        # moment, so it gets to read the answer instead of a reset.
        self._lingering = True
        self._disarm()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
        client = f"{self.client[0]}" if self.client else "-"
        self.access.info('%s - "-" %d %s\n', client, status, PROTOCOL_ERRORS[status][1])

    # uvicorn's hooks ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # the head and the body go out in two writes: no Nagle wait between them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) > self.limits.max_connections:
            self.app = self.too_many_connections
        self._arm("head", self.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._dropped += len(data)
            if self._dropped > LINGER_MAX_BYTES:
                self.transport.close()
            return
        waiting_for_head = self.conn.their_state is h11.IDLE
        if waiting_for_head:
            if self._deadline_kind != "head":
                self._arm("head", self.limits.head_timeout)
            self._head_bytes += len(data)
            self._line_seen = self._line_seen or b"\n" in data
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._deadline_kind != "body":
            self._arm("body", self.limits.body_timeout)
        elif state is h11.DONE and self._deadline_kind:
            self._disarm()
        if state is not h11.IDLE:
            self._head_bytes, self._line_seen = 0, False

    def send_400_response(self, msg: str) -> None:
        too_big = self._head_bytes > self.limits.max_buffered_head
        status = (431 if self._line_seen else 414) if too_big else 400
        self._disarm()
        self._refuse(status)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()  # arms uvicorn's keep-alive timer


# -- the API: requests to proxy events and back ----------------------------------------------------


class LocalApiGateway:
    """The HTTP server on 127.0.0.1 and the pool of execution environments behind it."""

    def __init__(self, *, api_key: str, lambda_env: dict[str, str], processes: Any, log_dir: Path,
                 port: int = 0, concurrency: int = 4, cors_origins: list[str] | tuple[str, ...] = ("*",), limits: Limits | None = None,
                 pool: Any = None) -> None:
        self.api_key = api_key
        self.port = port
        self.cors_origins = list(cors_origins)
        self.binary_types = list(BINARY_MEDIA_TYPES)
        self.limits = limits or Limits()
        # ``pool``: anything with invoke(event) -> response, start() and stop(); the execution environments by default.
        self.lambdas = pool if pool is not None else LambdaPool(concurrency, lambda_env, processes, log_dir)
        self.log_dir = Path(log_dir)
        self.access_log = logging.getLogger(f"cxr.twin.access.{id(self)}")
        self.in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LocalApiGateway:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.access_log = rotating_logger(self.access_log.name, self.log_dir / "access.log")
        self.lambdas.start()
        self._executor = ThreadPoolExecutor(self.limits.max_in_flight, thread_name_prefix="twin-invoke")
        protocol = type("GatewayProtocol", (_Protocol,), {
            "limits": self.limits, "access": self.access_log, "too_many_connections": self._too_many_connections})
        config = uvicorn.Config(
            self.asgi, http=protocol, interface="asgi3", lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False,
            timeout_keep_alive=self.limits.keep_alive_timeout,
            timeout_graceful_shutdown=int(self.limits.graceful_seconds + 0.999),
            h11_max_incomplete_event_size=self.limits.max_buffered_head, backlog=2048)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="twin-apigateway", daemon=True)
        self._thread.start()
        # Up when it answers at all: /health may be 503 while no model can be loaded.
        wait_until(lambda: _http_status(self.url + "health") > 0, 60, f"the local API on {self.url}", interval=0.2,
                   alive=lambda: None if self._thread.is_alive() else "the HTTP server stopped")
        return self

    def stop(self) -> None:
        """Stop taking connections, let requests in flight finish, then stop the environments."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.limits.graceful_seconds + 5)
            self._thread = None
        self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.lambdas.stop()
        close_logger(self.access_log)

    # requests ----------------------------------------------------------------------------------

    async def _too_many_connections(self, scope: dict, receive: Any, send: Any) -> None:
        body = gateway_error("TOO_MANY_CONNECTIONS", "Service Unavailable")
        self._log(scope, "-", 503, len(body), 0.0)
        await self._respond(send, 503, [("Retry-After", "1"), ("Connection", "close")], body)

    async def asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        request_id = str(uuid.uuid4())
        try:
            answer = await self._handle(scope, receive, request_id)
        except Exception:  # noqa: BLE001 - a bug here must still answer JSON, and never log the request
            LOG.exception("the local API failed on a request")
            answer = (500, [], gateway_error("INTERNAL_ERROR", "Internal server error"))
        if answer is None:  # the client went away while sending its body
            return
        status, headers, body = answer
        headers = [*headers, ("x-amzn-RequestId", request_id)]
        self._log(scope, request_id, status, len(body), (time.perf_counter() - t0) * 1000.0)
        await self._respond(send, status, headers, body)

    @staticmethod
    async def _respond(send: Any, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        out: list[tuple[bytes, bytes]] = []
        names = set()
        for k, v in headers:
            lk = k.lower()
            if lk in ("content-length", "transfer-encoding") or (lk == "connection" and v.lower() != "close"):
                continue
            names.add(lk)
            out.append((k.encode("latin-1"), str(v).encode("latin-1", "replace")))
        if "content-type" not in names:
            out.append((b"content-type", b"application/json"))
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope: dict, request_id: str, status: int, size: int, ms: float) -> None:
        headers = {k: v for k, v in scope.get("headers", []) if k in (b"content-type", b"content-length",
                                                                     b"user-agent")}
        method = scope.get("method", "")
        path = _resource(scope.get("path", ""))
        media = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip()
        length = headers.get(b"content-length", b"").decode("latin-1")
        self.access_log.info('%s %s "%s %s" %d %d %.1fms type=%s length=%s ua="%s"\n',
                             (scope.get("client") or ["-"])[0], request_id or "-",
                             method if method in METHODS else "OTHER", path if path in RESOURCES else "-",
                             status, size, ms, _safe(media, 60), length if length.isdigit() else "-",
                             _safe(headers.get(b"user-agent", b"").decode("latin-1"), 80))

    async def _read_body(self, scope: dict, receive: Any) -> bytes | str | None:
        """The body; ``"too large"`` over the payload limit (read and dropped, so the client sees the
        413 rather than a reset), ``"far too large"`` beyond 8x the limit (not read: the connection
        closes); None when the client went away."""
        limit = self.limits.max_payload
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > 8 * limit:
            return "far too large"
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > 8 * limit:
                return "far too large"
            if total <= limit:
                chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks) if total <= limit else "too large"

    async def _handle(self, scope: dict, receive: Any, request_id: str) -> tuple[int, list, bytes] | None:
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
        allow_origin = cors_allow_origin(origin, self.cors_origins)
        cors = [("Access-Control-Allow-Origin", allow_origin)] if allow_origin else []
        method = scope["method"]
        query = scope.get("query_string", b"")
        line = len(method) + len(scope.get("raw_path") or b"") + (len(query) + 1 if query else 0) + len(" HTTP/1.1")
        head = line + sum(len(v) for _, v in scope["headers"])
        if line > self.limits.max_head_bytes:
            return 414, [*cors, ("Connection", "close")], gateway_error("URI_TOO_LONG", "Request-URI Too Long")
        if head > self.limits.max_head_bytes:
            return 431, [*cors, ("Connection", "close")], gateway_error(
                "REQUEST_HEADER_FIELDS_TOO_LARGE", "Request Header Fields Too Large")
        body = await self._read_body(scope, receive)
        if body is None:
            return None
        if isinstance(body, str):
            close = [("Connection", "close")] if body == "far too large" else []
            return 413, [*cors, *close], gateway_error("REQUEST_TOO_LARGE", "Request Too Long")
        path = scope.get("path") or "/"
        if path == f"/{STAGE}" or path.startswith(f"/{STAGE}/"):
            path = path[len(STAGE) + 1:] or "/"
        resource = _resource(path)
        if method == "OPTIONS" and resource in RESOURCES:
            return 204, [*cors, ("Access-Control-Allow-Methods", ",".join(CORS_ALLOW_METHODS)),
                         ("Access-Control-Allow-Headers", ",".join(CORS_ALLOW_HEADERS)),
                         ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))], b""
        route = ("GET" if method == "HEAD" else method, resource)
        if route not in ROUTES:
            return 403, cors, gateway_error("MISSING_AUTHENTICATION_TOKEN", "Missing Authentication Token")
        header_items = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        api_key = next((v for k, v in header_items if k.lower() == "x-api-key"), None)
        if route in KEY_REQUIRED and not (api_key and hmac.compare_digest(api_key.encode(), self.api_key.encode())):
            return 403, cors, gateway_error("INVALID_API_KEY", "Forbidden")
        if self.in_flight >= self.limits.max_in_flight:
            return 429, [*cors, ("Retry-After", "1")], gateway_error("THROTTLED", "Too Many Requests")
        client = (scope.get("client") or [LOOPBACK])[0]
        event = self.event(route[0], resource, path, query.decode("latin-1"), _canonical(header_items), body,
                           client, request_id, api_key if route in KEY_REQUIRED else None)
        self.in_flight += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self.lambdas.invoke, event)
        except TimeoutError:
            return 504, cors, gateway_error("INTEGRATION_TIMEOUT", "Endpoint request timed out")
        except (LambdaError, OSError, ValueError) as exc:
            LOG.error("the function failed: %s", str(exc)[:300])
            return 502, cors, gateway_error("INTEGRATION_FAILURE", "Internal server error")
        finally:
            self.in_flight -= 1
        status, headers, payload = proxy_response(result)
        if status is None:
            return 502, cors, gateway_error("INTEGRATION_FAILURE", "Internal server error")
        return status, headers, payload

    def event(self, method: str, resource: str, path: str, query: str, header_items, body: bytes, source_ip: str,
              request_id: str, api_key: str | None) -> dict[str, Any]:
        """The REST API (v1) proxy event API Gateway sends to the function for this request."""
        headers: dict[str, str] = {}
        multi: dict[str, list[str]] = {}
        for k, v in header_items:
            headers[k] = v
            multi.setdefault(k, []).append(v)
        for k, v in (("X-Forwarded-For", source_ip), ("X-Forwarded-Proto", "http"),
                     ("X-Forwarded-Port", str(self.port))):
            headers.setdefault(k, v)
            multi.setdefault(k, [v])
        pairs = parse_qsl(query, keep_blank_values=True)
        qs: dict[str, str] = {}
        mqs: dict[str, list[str]] = {}
        for k, v in pairs:
            qs[k] = v
            mqs.setdefault(k, []).append(v)
        content_type = next((v for k, v in header_items if k.lower() == "content-type"), None)
        if not body and method == "GET":
            text, encoded = None, False
        elif is_binary(content_type, self.binary_types):
            text, encoded = base64.b64encode(body).decode("ascii"), True
        else:
            # Not a binary media type: API Gateway passes the body on as UTF-8 text, bytes that are
            # not valid UTF-8 replaced, so an image sent under a type missing from the list arrives broken.
            text, encoded = body.decode("utf-8", "replace"), False
        now = datetime.now(UTC)
        return {
            "resource": resource,
            "path": path if path == "/" else path.rstrip("/"),
            "httpMethod": method,
            "headers": headers or None,
            "multiValueHeaders": multi or None,
            "queryStringParameters": qs or None,
            "multiValueQueryStringParameters": mqs or None,
            "pathParameters": None,
            "stageVariables": None,
            "requestContext": {
                "resourceId": resource.strip("/") or "root", "resourcePath": resource, "httpMethod": method,
                "path": f"/{STAGE}{path}", "stage": STAGE, "requestId": request_id,
                "extendedRequestId": request_id, "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "requestTimeEpoch": int(now.timestamp() * 1000), "protocol": "HTTP/1.1",
                "accountId": "123456789012", "apiId": "twin", "domainName": f"{LOOPBACK}:{self.port}",
                "identity": {"sourceIp": source_ip, "userAgent": headers.get("User-Agent"),
                             "apiKey": api_key, "apiKeyId": API_KEY_ID if api_key else None},
            },
            "body": text,
            "isBase64Encoded": encoded,
        }


def _canonical(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header names as clients usually spell them (the parser lowercases them): ``Content-Type``."""
    return [("-".join(p[:1].upper() + p[1:] for p in k.split("-")), v) for k, v in items]


def _resource(path: str) -> str:
    if path == f"/{STAGE}" or path.startswith(f"/{STAGE}/"):
        path = path[len(STAGE) + 1:] or "/"
    return path.rstrip("/") or "/"


def proxy_response(result: dict[str, Any]) -> tuple[int | None, list[tuple[str, str]], bytes]:
    """A proxy integration's response as (status, headers, body); status None when it is malformed."""
    if not isinstance(result, dict) or "errorType" in result or not isinstance(result.get("statusCode"), int):
        return None, [], b""
    headers: dict[str, str] = {}
    for k, v in (result.get("headers") or {}).items():
        headers[str(k)] = str(v)
    for k, vs in (result.get("multiValueHeaders") or {}).items():
        headers[str(k)] = ", ".join(str(v) for v in vs)
    body = result.get("body") or ""
    try:
        payload = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode("utf-8")
    except (ValueError, TypeError):
        return None, [], b""
    return result["statusCode"], list(headers.items()), payload





def _http_status(url: str, timeout: float = 5.0) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def lambda_environment(*, s3_endpoint: str, control_endpoint: str, pointer_parameter: str, cache_dir: Path,
                       ttl_seconds: int = 2, threads: int = 1, extra: dict[str, str] | None = None,
                       cors_origins: list[str] | tuple[str, ...] = ("*",)) -> dict[str, str]:
    """The function's environment variables, as the stack sets them, pointed at the twin's servers."""
    from .servers import aws_env

    env = aws_env({
        "MODEL_URI": f"ssm:{pointer_parameter}",
        "MODEL_POINTER_TTL_SECONDS": str(ttl_seconds),
        "MODEL_CACHE_DIR": str(cache_dir),
        # One intra-op thread per environment: concurrency comes from several environments, as in Lambda.
        "MODEL_THREADS": str(threads),
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ENDPOINT_URL_SSM": control_endpoint,
        "POWERTOOLS_SERVICE_NAME": os.environ.get("POWERTOOLS_SERVICE_NAME", "cxr-inference"),
        "POWERTOOLS_METRICS_NAMESPACE": os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "CxrPneumonia"),
        "POWERTOOLS_LOG_LEVEL": "INFO",
        "CORS_ALLOW_ORIGINS": ",".join(cors_origins),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": "1",  # as the inference image sets it (inference_lambda/Dockerfile)
    })
    env.update(extra or {})
    return env
