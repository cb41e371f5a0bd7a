"""The twin's HTTP front under hostile clients: parsing, limits, deadlines, logs, shutdown.

A stand-in for the execution environments answers here (no child processes), so these tests
exercise the server alone and stay fast; ``test_twin_gateway`` covers the environments.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_inference_support import PATIENT_ID, PATIENT_NAME, dicom_bytes
from test_twin_support import call, call_json

from infra.twin.gateway import Limits, LocalApiGateway

KEY = "test-key-0123456789abcdefghij"


class StandInPool:
    """Answers every event like a healthy function, after ``delay`` seconds; records the events."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.events: list[dict] = []

    def start(self):
        return self

    def stop(self):
        pass

    def invoke(self, event, timeout=29.0):
        self.events.append(event)
        time.sleep(self.delay)
        return {"statusCode": 200, "headers": {"Content-Type": "application/json"},
                "body": json.dumps({"status": "ok", "path": event["path"]})}


def _gateway(tmp_path, pool=None, **limits) -> LocalApiGateway:
    return LocalApiGateway(api_key=KEY, lambda_env={}, processes=None, log_dir=tmp_path / "logs",
                           limits=Limits(**limits), pool=pool or StandInPool())


@pytest.fixture
def gateway(tmp_path):
    gw = _gateway(tmp_path, head_timeout=2.0, body_timeout=2.0).start()
    yield gw
    gw.stop()


def raw(gw: LocalApiGateway, data: bytes, timeout: float = 10.0) -> list[tuple[int, dict]]:
    """Send bytes as they are; every response read until the server closes: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
    return parse_responses(got)


def parse_responses(data: bytes) -> list[tuple[int, dict]]:
    out = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        body, data = rest[:n], rest[n:]
        assert headers.get("content-type") == "application/json", (lines[0], headers, body[:200])
        out.append((int(lines[0].split()[1]), json.loads(body) if body else {}))
    assert not data, data[:200]
    return out


def every_log(gw: LocalApiGateway) -> bytes:
    return b"".join(p.read_bytes() for p in gw.log_dir.rglob("*") if p.is_file())


# -- 1. nothing of a body reaches a log ---------------------------------------------------------


def test_bytes_after_a_short_content_length_never_reach_a_log(gateway, caplog):
    dicom = dicom_bytes(np.full((64, 64), 100, np.uint8))
    assert PATIENT_NAME.encode() in dicom
    request = (b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/dicom\r\nContent-Length: 10\r\n\r\n"
               + dicom)
    answers = raw(gateway, request)
    # The declared 10 bytes are the request (no key: 403); what follows is not a request: 400, closed.
    assert [s for s, _ in answers] == [403, 400]
    assert answers[1][1]["error"]["code"] == "BAD_REQUEST"
    logs = every_log(gateway) + caplog.text.encode()
    assert b"/predict" in logs  # the access log was written
    for secret in (PATIENT_NAME.encode(), PATIENT_ID.encode(), b"DICM", dicom[132:180]):
        assert secret not in logs


def test_the_access_log_holds_no_query_key_or_unknown_path(gateway):
    call(gateway.url + "health?patient=Jane%20Doe", headers={"x-api-key": KEY, "Authorization": "Bearer s3cr3t",
                                                           "User-Agent": "probe\x01<script>"})
    call(gateway.url + "Jane-Doe-1970-01-01")
    log = (gateway.log_dir / "access.log").read_text()
    assert '"GET /health" 200' in log and '"GET -" 403' in log
    for secret in ("Jane", "patient", KEY, "s3cr3t", "<script>", "\x01"):
        assert secret not in log


# -- 2. slow clients --------------------------------------------------------------------------------


def test_health_answers_within_a_second_while_200_slow_connections_are_open(gateway):
    slow = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow-%d: 1\r\n" % i)  # and never the rest
            slow.append(s)
        t0 = time.monotonic()
        status, doc = call_json(gateway.url + "health", timeout=1.0)
        assert status == 200 and doc["status"] == "ok" and time.monotonic() - t0 < 1.0
        # A client that keeps trickling bytes is cut off at the head deadline (2 s here), with a JSON 408.
        trickler = slow[0]
        for _ in range(6):
            try:
                trickler.sendall(b"X-More: 1\r\n")
            except OSError:
                break
            time.sleep(0.5)
        trickler.settimeout(5)
        assert parse_responses(trickler.recv(65536))[0][0] == 408
    finally:
        for s in slow:
            s.close()


def test_a_body_that_never_arrives_is_answered_408(gateway):
    answers = raw(gateway, b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nx-api-key: " + KEY.encode()
                  + b"\r\n\r\nonly a part")
    assert answers == [(408, answers[0][1])] and answers[0][1]["error"]["code"] == "REQUEST_TIMEOUT"


# -- 6. JSON for everything the server answers itself ---------------------------------------------


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"TRACE / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 403, "MISSING_AUTHENTICATION_TOKEN"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n", 403, "MISSING_AUTHENTICATION_TOKEN"),
    (b"PROPFIND /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 403, "MISSING_AUTHENTICATION_TOKEN"),
    (b"get /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 403, "MISSING_AUTHENTICATION_TOKEN"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 a TLS hello\r\n\r\n", 400, "BAD_REQUEST"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", 400, "BAD_REQUEST"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n", 400, "BAD_REQUEST"),
    (b"GET /" + b"a" * 11_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "URI_TOO_LONG"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "URI_TOO_LONG"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 11_000 + b"\r\n\r\n", 431, "REQUEST_HEADER_FIELDS_TOO_LARGE"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-Many: 0123456789\r\n" * 300_000 + b"\r\n", 431,
     "REQUEST_HEADER_FIELDS_TOO_LARGE"),  # 6 MB of headers
], ids=["TRACE", "CONNECT", "PROPFIND", "lowercase-get", "tls-hello", "no-colon", "negative-length", "url-11k",
        "url-20k", "header-11k", "headers-6mb"])
def test_every_method_and_malformed_request_gets_json(gateway, request_bytes, status, code):
    answers = raw(gateway, request_bytes)
    assert answers and answers[0][0] == status, answers
    doc = answers[0][1]
    assert doc["error"]["code"] == code and doc["message"] == doc["error"]["message"]


# -- limits, overload, shutdown ---------------------------------------------------------------------


def test_connections_over_the_limit_get_503_json_not_a_reset(tmp_path):
    gw = _gateway(tmp_path, max_connections=4).start()
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        answers = raw(gw, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert [s for s, _ in answers] == [503] and answers[0][1]["error"]["code"] == "TOO_MANY_CONNECTIONS"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert call_json(gw.url + "health")[0] == 200  # room again
    gw.stop()


def test_requests_over_the_in_flight_limit_get_429_json(tmp_path):
    gw = _gateway(tmp_path, pool=StandInPool(delay=1.0), max_in_flight=2).start()
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: call_json(gw.url + "health"), range(3)))
        statuses = sorted(s for s, _ in answers)
        assert statuses == [200, 200, 429]
        assert next(d for s, d in answers if s == 429)["error"]["code"] == "THROTTLED"
    finally:
        gw.stop()


def test_stopping_lets_a_request_in_flight_finish(tmp_path):
    gw = _gateway(tmp_path, pool=StandInPool(delay=1.5)).start()
    result = {}
    t = threading.Thread(target=lambda: result.update(answer=call_json(gw.url + "health", timeout=10)))
    t.start()
    time.sleep(0.5)  # the request is in the function now
    gw.stop()
    t.join(10)
    assert result["answer"][0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
