"""A small local API Gateway in front of the inference Lambda's handler.

It does what the stack's REST API does (``infra/constructs/serving.py``), on 127.0.0.1:

- resources ``GET /``, ``GET /health`` and ``POST /predict`` (the last needs the API key in
  ``x-api-key``), CORS preflight on each; any other method or path gets API Gateway's 403
  "Missing Authentication Token". The ``/prod`` stage prefix of the cloud URL is accepted too;
- each request becomes a REST API (v1) proxy event: headers and multi-value headers, query
  parameters, the body base64-encoded with ``isBase64Encoded`` when its content type is one of the
  API's binary media types; the handler's response comes back as the HTTP response;
- errors API Gateway answers itself carry the stack's gateway-response shape
  ``{"error": {"code", "message"}}`` next to API Gateway's own ``message`` field;
- the function runs in Lambda *execution environments*: child processes that each import the
  handler once and handle one event at a time (:mod:`infra.twin.lambda_runtime`). Concurrent
  requests go to different environments, as Lambda scales out; each request waits at most the
  integration timeout for a free one.

Usage plans (throttling, quotas) are not emulated.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import os
import queue
import select
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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
from .processes import LOOPBACK, ProcessGroup, stop, tail, wait_until

LOG = logging.getLogger("cxr.twin.gateway")

STAGE = STAGE_NAME
# (method, resource) pairs the REST API defines; POST /predict needs the API key.
ROUTES = {(m, path) for path, methods in _ROUTES.items() for m in methods}
KEY_REQUIRED = set(_KEY_REQUIRED)
MAX_PAYLOAD = 10 * 1024 * 1024  # API Gateway's request payload limit
INTEGRATION_TIMEOUT = 29.0
ENV_START_TIMEOUT = 180.0
MAX_CONNECTIONS = 128
API_KEY_ID = "twinkey"


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


# -- Lambda execution environments ---------------------------------------------------------------


class LambdaError(RuntimeError):
    pass


class LambdaEnvironment:
    """One child process running :mod:`infra.twin.lambda_runtime`."""

    def __init__(self, index: int, processes: ProcessGroup, env: dict[str, str], log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = processes.start(f"lambda-{index}", [sys.executable, "-m", "infra.twin.lambda_runtime"],
                                        env=env, cwd=ROOT, stdin=-1, stdout=-1, stderr=log)
        finally:
            log.close()
        self.processes = processes
        self.ready: dict[str, Any] | None = None

    def _read_line(self, timeout: float) -> dict[str, Any]:
        fd = self.proc.stdout
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            raise TimeoutError("no answer")
        line = fd.readline()
        if not line:
            raise LambdaError(f"the execution environment exited ({self.proc.poll()}): {tail(self.log_path, 600)}")
        return json.loads(line)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        doc = self._read_line(timeout)
        if not doc.get("ready"):
            raise LambdaError(f"init failed: {doc.get('errorType')}: {doc.get('errorMessage')}")
        self.ready = doc
        return doc

    def invoke(self, event: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(event).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_line(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop(self.proc, grace=3.0)
        self.processes.forget(self.proc)


class LambdaPool:
    """A fixed number of warm execution environments; a broken one is replaced by a fresh one."""

    def __init__(self, size: int, env: dict[str, str], processes: ProcessGroup, log_dir: Path) -> None:
        self.size = max(1, size)
        self.env = env
        self.processes = processes
        self.log_dir = Path(log_dir)
        self._idle: queue.Queue[LambdaEnvironment] = queue.Queue()
        self._all: list[LambdaEnvironment] = []
        self._counter = 0
        self._lock = threading.Lock()
        self.cold_starts = 0

    def _spawn(self) -> LambdaEnvironment:
        with self._lock:
            self._counter += 1
            n = self._counter
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Each environment has its own /tmp in Lambda; here its own model cache folder.
        env_vars = dict(self.env)
        if env_vars.get("MODEL_CACHE_DIR"):
            env_vars["MODEL_CACHE_DIR"] = str(Path(env_vars["MODEL_CACHE_DIR"]) / f"env-{n}")
        env = LambdaEnvironment(n, self.processes, env_vars, self.log_dir / "lambda.log")
        with self._lock:
            self._all.append(env)
            self.cold_starts += 1
        return env

    def start(self) -> LambdaPool:
        envs = [self._spawn() for _ in range(self.size)]
        deadline = time.monotonic() + ENV_START_TIMEOUT
        for env in envs:
            env.wait_ready(deadline - time.monotonic())
            self._idle.put(env)
        return self

    def _replace(self, broken: LambdaEnvironment) -> None:
        broken.stop()
        with self._lock:
            if broken in self._all:
                self._all.remove(broken)

        def cold_start() -> None:
            try:
                fresh = self._spawn()
                fresh.wait_ready(ENV_START_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - logged; the pool runs one short until the next failure
                LOG.error("could not start a new execution environment: %s", exc)
                return
            self._idle.put(fresh)

        threading.Thread(target=cold_start, name="lambda-cold-start", daemon=True).start()

    def invoke(self, event: dict[str, Any], timeout: float = INTEGRATION_TIMEOUT) -> dict[str, Any]:
        started = time.monotonic()
        try:
            env = self._idle.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no execution environment became free") from None
        try:
            result = env.invoke(event, timeout - (time.monotonic() - started))
        except (TimeoutError, LambdaError, OSError, ValueError):
            self._replace(env)
            raise
        self._idle.put(env)
        return result

    def stop(self) -> None:
        with self._lock:
            envs, self._all = list(self._all), []
        for env in envs:
            env.stop()


# -- HTTP front ----------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, gateway: LocalApiGateway):
        self.gateway = gateway
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "cxr-twin-apigateway"
    timeout = 60  # a client that stops sending is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        self.server.gateway.access_log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def _read_body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            for _ in range(100_000):
                size = int((self.rfile.readline(64).split(b";", 1)[0].strip() or b"0"), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_PAYLOAD:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_PAYLOAD:
            # Read what was sent (up to a bound) so the client sees the 413 rather than a reset connection.
            left = length if length <= 8 * MAX_PAYLOAD else 0
            while left > 0:
                got = self.rfile.read(min(left, 1 << 20))
                if not got:
                    break
                left -= len(got)
            if length > 8 * MAX_PAYLOAD:
                self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        names = {k.lower() for k, _ in headers}
        for k, v in headers:
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", self._request_id)
        # Head and body in one write: two small writes meet the client's delayed ACK (a 40 ms stall).
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def _dispatch(self) -> None:
        gw: LocalApiGateway = self.server.gateway
        self._request_id = str(uuid.uuid4())
        url = urlsplit(self.path)
        path = url.path or "/"
        if path == f"/{STAGE}" or path.startswith(f"/{STAGE}/"):
            path = path[len(STAGE) + 1:] or "/"
        resource = path.rstrip("/") or "/"
        method = self.command
        allow_origin = cors_allow_origin(self.headers.get("Origin"), gw.cors_origins)
        cors = [("Access-Control-Allow-Origin", allow_origin)] if allow_origin else []
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send(400, cors, gateway_error("BAD_REQUEST_BODY", "Invalid request body"))
            return
        if body is None:
            self._send(413, cors, gateway_error("REQUEST_TOO_LARGE", "Request Too Long"))
            return
        known = {r for _, r in ROUTES}
        if method == "OPTIONS" and resource in known:
            self._send(204, [*cors, ("Access-Control-Allow-Methods", ",".join(CORS_ALLOW_METHODS)),
                             ("Access-Control-Allow-Headers", ",".join(CORS_ALLOW_HEADERS)),
                             ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))], b"")
            return
        route = ("GET" if method == "HEAD" else method, resource)
        if route not in ROUTES:
            self._send(403, cors, gateway_error("MISSING_AUTHENTICATION_TOKEN", "Missing Authentication Token"))
            return
        api_key = self.headers.get("x-api-key")
        if route in KEY_REQUIRED and not (api_key and hmac.compare_digest(api_key.encode(), gw.api_key.encode())):
            self._send(403, cors, gateway_error("INVALID_API_KEY", "Forbidden"))
            return
        event = gw.event(route[0], resource, path, url.query, self.headers.items(), body,
                         self.client_address[0], self._request_id, api_key if route in KEY_REQUIRED else None)
        try:
            result = gw.lambdas.invoke(event)
        except TimeoutError:
            self._send(504, cors, gateway_error("INTEGRATION_TIMEOUT", "Endpoint request timed out"))
            return
        except (LambdaError, OSError, ValueError) as exc:
            LOG.error("the function failed: %s", exc)
            self._send(502, cors, gateway_error("INTEGRATION_FAILURE", "Internal server error"))
            return
        status, headers, payload = proxy_response(result)
        if status is None:
            self._send(502, cors, gateway_error("INTEGRATION_FAILURE", "Internal server error"))
            return
        self._send(status, headers, payload)


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


class LocalApiGateway:
    """The HTTP server on 127.0.0.1 and the pool of execution environments behind it."""

    def __init__(self, *, api_key: str, lambda_env: dict[str, str], processes: ProcessGroup, log_dir: Path,
                 port: int = 0, concurrency: int = 4, cors_origins: list[str] | tuple[str, ...] = ("*",)) -> None:
        self.api_key = api_key
        self.port = port
        self.cors_origins = list(cors_origins)
        self.binary_types = list(BINARY_MEDIA_TYPES)
        self.lambdas = LambdaPool(concurrency, lambda_env, processes, log_dir)
        self.log_dir = Path(log_dir)
        self.access_log = logging.getLogger("cxr.twin.access")
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def start(self) -> LocalApiGateway:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.access_log.handlers:
            h = logging.FileHandler(self.log_dir / "access.log")
            h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.access_log.addHandler(h)
            self.access_log.setLevel(logging.INFO)
            self.access_log.propagate = False
        self.lambdas.start()
        self._server = _Server((LOOPBACK, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="twin-apigateway", daemon=True)
        self._thread.start()
        wait_until(lambda: _http_status(self.url + "health") == 200, 60, f"the local API on {self.url}",
                   interval=0.5)
        return self

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

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.lambdas.stop()
        for h in list(self.access_log.handlers):
            self.access_log.removeHandler(h)
            with contextlib.suppress(Exception):
                h.close()


def _http_status(url: str, timeout: float = 5.0) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


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
    })
    env.update(extra or {})
    return env
