"""The twin's local API Gateway: proxy events, the API key, gateway errors, execution environments.

The environments here serve the session's tiny bundle from a folder, so no S3 or SSM is needed.
"""

from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, original_images
from test_twin_support import call, call_json, processes_mentioning

from infra.names import BINARY_MEDIA_TYPES
from infra.twin.gateway import (
    LocalApiGateway,
    is_binary,
    lambda_environment,
    proxy_response,
)
from infra.twin.processes import ProcessGroup
from infra.twin.trigger import Executions, matches_rule

KEY = "test-key-0123456789abcdefghij"


def test_binary_media_types_are_the_stacks(tmp_path):
    types = _gateway(tmp_path).binary_types
    assert types == BINARY_MEDIA_TYPES
    assert {"image/jpeg", "image/png", "application/dicom", "multipart/form-data"} <= set(types)
    assert is_binary("image/jpeg", types) and is_binary("multipart/form-data; boundary=x", types)
    assert not is_binary("application/json", types) and not is_binary(None, types)


def _gateway(tmp_path, **kw) -> LocalApiGateway:
    env = lambda_environment(s3_endpoint="http://127.0.0.1:9", control_endpoint="http://127.0.0.1:9",
                             pointer_parameter="/unused", cache_dir=tmp_path / "cache", **kw)
    return LocalApiGateway(api_key=KEY, lambda_env=env, processes=ProcessGroup(), log_dir=tmp_path / "logs")


def test_requests_become_rest_api_proxy_events(tmp_path):
    gw = _gateway(tmp_path)
    jpeg = b"\xff\xd8\xff\xe0binary\x00\xff"
    ev = gw.event("POST", "/predict", "/predict", "explain=1&x=a&x=b",
                  [("Content-Type", "image/jpeg"), ("x-api-key", KEY), ("Accept", "a"), ("Accept", "b")],
                  jpeg, "127.0.0.1", "rid-1", KEY)
    assert ev["httpMethod"] == "POST" and ev["resource"] == "/predict" and ev["path"] == "/predict"
    assert ev["isBase64Encoded"] is True and base64.b64decode(ev["body"]) == jpeg
    assert ev["queryStringParameters"] == {"explain": "1", "x": "b"}
    assert ev["multiValueQueryStringParameters"]["x"] == ["a", "b"]
    assert ev["multiValueHeaders"]["Accept"] == ["a", "b"]
    ctx = ev["requestContext"]
    assert ctx["identity"]["apiKey"] == KEY and ctx["stage"] == "prod" and ctx["requestId"] == "rid-1"
    doc = json.dumps({"image_base64": "AAAA"}).encode()
    ev = gw.event("POST", "/predict", "/predict", "", [("Content-Type", "application/json")], doc, "127.0.0.1",
                  "rid-2", KEY)
    assert ev["isBase64Encoded"] is False and ev["body"] == doc.decode()
    ev = gw.event("GET", "/health", "/health", "", [], b"", "127.0.0.1", "rid-3", None)
    assert ev["body"] is None and ev["queryStringParameters"] is None and ev["requestContext"]["identity"]["apiKey"] is None


def test_proxy_responses_become_http_responses():
    status, headers, body = proxy_response({"statusCode": 201, "headers": {"A": "1"},
                                            "multiValueHeaders": {"B": ["2", "3"]}, "body": "hi"})
    assert status == 201 and dict(headers) == {"A": "1", "B": "2, 3"} and body == b"hi"
    assert proxy_response({"statusCode": 200, "body": base64.b64encode(b"\x89PNG").decode(),
                           "isBase64Encoded": True})[2] == b"\x89PNG"
    for bad in ({"errorType": "Boom", "errorMessage": "x"}, {"body": "no status"}, "nope"):
        assert proxy_response(bad)[0] is None


def test_the_rule_passes_markers_only():
    def ev(key, bucket="data", source="aws.s3"):
        return {"source": source, "detail-type": "Object Created",
                "detail": {"bucket": {"name": bucket}, "object": {"key": key}}}

    assert matches_rule(ev("datasets/a/_READY"), "data")
    assert matches_rule(ev("datasets/a/b/_READY"), "data")  # EventBridge's '*' spans '/'; the starter refuses it
    assert not matches_rule(ev("datasets/a/train/NORMAL/x.jpeg"), "data")
    assert not matches_rule(ev("datasets/a/_READY", bucket="other"), "data")
    assert not matches_rule(ev("datasets/a/_READY", source="aws.ec2"), "data")


def test_an_execution_name_starts_once(tmp_path):
    ex = Executions(tmp_path)
    assert ex.start("cxr-a-1", {"run": {}}) is True
    assert ex.start("cxr-a-1", {"run": {}}) is False
    assert ex.interrupted() == []  # still owned by this live process
    rec = json.loads((tmp_path / "cxr-a-1.json").read_text())
    rec["pid"] = 2 ** 22 + 12345  # a process that does not exist: the twin that ran it is gone
    (tmp_path / "cxr-a-1.json").write_text(json.dumps(rec))
    assert [r["name"] for r in ex.interrupted()] == ["cxr-a-1"]
    assert ex.resume("cxr-a-1")["attempt"] == 2
    ex.finish("cxr-a-1", "SUCCEEDED", {"x": 1}, ["A"])
    assert ex.get("cxr-a-1")["status"] == "SUCCEEDED" and ex.start("cxr-a-1", {}) is False


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_bundle):
    tmp = tmp_path_factory.mktemp("gateway")
    gw = _gateway(tmp, extra={"MODEL_URI": str(tiny_bundle)})
    gw.lambdas.size = 2
    gw.start()
    yield gw
    pids = [env.proc.pid for env in gw.lambdas._all]
    gw.stop()
    alive = [pid for pid in pids if any(p == pid for p, _ in processes_mentioning("infra.twin.lambda_runtime"))]
    assert not alive, f"execution environments outlived the gateway: {alive}"


def _jpeg() -> bytes:
    return original_images()[0].read_bytes()


@pytest.mark.slow
def test_open_routes_and_the_page(gateway):
    status, doc = call_json(gateway.url + "health")
    assert status == 200 and doc["model"]["version"] == "test-tiny-0001"
    status, headers, body = call(gateway.url)
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<form" in body
    assert call(gateway.url + "prod/health")[0] == 200  # the cloud URL's stage prefix works too


@pytest.mark.slow
def test_predict_needs_the_api_key(gateway):
    for headers in ({}, {"x-api-key": "wrong-key-0123456789abcdef"}, {"x-api-key": ""}):
        status, doc = call_json(gateway.url + "predict", "POST", _jpeg(), {"Content-Type": "image/jpeg", **headers})
        assert status == 403 and doc["message"] == "Forbidden" and doc["error"]["code"] == "INVALID_API_KEY"
    status, doc = call_json(gateway.url + "predict", "POST", _jpeg(), {"Content-Type": "image/jpeg", "x-api-key": KEY})
    assert status == 200 and doc["label"] in ("NORMAL", "PNEUMONIA") and 0 <= doc["probability"] <= 1


@pytest.mark.slow
def test_every_input_kind_reaches_the_handler(gateway):
    raw = _jpeg()
    url = gateway.url + "predict?explain=1"
    status, doc = call_json(url, "POST", raw, {"Content-Type": "image/jpeg", "x-api-key": KEY})
    assert status == 200 and base64.b64decode(doc["heatmap_png_base64"])[:4] == b"\x89PNG"
    body = json.dumps({"image_base64": base64.b64encode(raw).decode()}).encode()
    status, doc = call_json(gateway.url + "predict", "POST", body, {"Content-Type": "application/json", "x-api-key": KEY})
    assert status == 200 and doc["label"]
    boundary = "----twin"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpeg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    status, doc = call_json(gateway.url + "predict", "POST", form,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}", "x-api-key": KEY})
    assert status == 200 and doc["label"]
    status, doc = call_json(gateway.url + "predict", "POST", b"not an image", {"Content-Type": "image/jpeg",
                                                                               "x-api-key": KEY})
    assert 400 <= status < 500 and doc["error"]["code"]


@pytest.mark.slow
def test_gateway_answers_what_api_gateway_answers_itself(gateway):
    for method, path in (("GET", "predict"), ("GET", "nowhere"), ("DELETE", "health"), ("POST", "")):
        status, doc = call_json(gateway.url + path, method, b"" if method != "GET" else None)
        assert status == 403 and doc["error"]["code"] == "MISSING_AUTHENTICATION_TOKEN", (method, path)
    status, headers, _ = call(gateway.url + "predict", "OPTIONS", headers={"Origin": "http://example.test"})
    assert status == 204 and "x-api-key" in headers["access-control-allow-headers"].lower()
    status, doc = call_json(gateway.url + "predict", "POST", b"\0" * (10 * 1024 * 1024 + 1),
                            {"Content-Type": "image/jpeg", "x-api-key": KEY})
    assert status == 413 and doc["error"]["code"] == "REQUEST_TOO_LARGE"


@pytest.mark.slow
def test_concurrent_requests_and_a_crashed_environment(gateway):
    raw = _jpeg()

    def post(_):
        return call_json(gateway.url + "predict", "POST", raw, {"Content-Type": "image/jpeg", "x-api-key": KEY})[0]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(post, range(16))) == {200}
    # An environment that dies (out of memory, a crash) answers 502 once and is replaced by a cold start.
    victim = gateway.lambdas._all[0]
    victim.proc.kill()
    victim.proc.wait(10)
    statuses = [post(i) for i in range(3)]
    assert statuses == [200, 200, 200]  # it never took any of them: none fails
    deadline = time.monotonic() + 120
    while gateway.lambdas._idle.qsize() < gateway.lambdas.size and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gateway.lambdas._idle.qsize() == gateway.lambdas.size and gateway.lambdas.cold_starts == 3
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(post, range(8))) == {200}


def test_a_body_outside_the_binary_media_types_arrives_as_text_like_on_api_gateway(tmp_path, originals):
    # API Gateway decodes such a body as UTF-8 and replaces what is not: a JPEG sent under an
    # unlisted type reaches the function broken, so the handler must refuse it, not predict.
    from test_inference_support import FakeContext, Reply

    from inference_lambda import app

    gw = _gateway(tmp_path)
    jpeg = originals[0].read_bytes()
    ev = gw.event("POST", "/predict", "/predict", "", [("Content-Type", "image/x-unlisted-jpeg")], jpeg,
                  "127.0.0.1", "rid-4", KEY)
    assert ev["isBase64Encoded"] is False and "\ufffd" in ev["body"]
    ev["headers"]["Content-Type"] = "image/jpeg"  # as if the handler accepted a type the API lacked
    reply = Reply(app.handler(ev, FakeContext()))
    assert reply.status in (400, 415) and reply.error_code in ("corrupt_image", "unsupported_media_type")
    for media_type in ("image/jpg", "image/pjpeg", "application/dicom+octet-stream"):
        ev = gw.event("POST", "/predict", "/predict", "", [("Content-Type", media_type)], jpeg, "127.0.0.1",
                      "rid-5", KEY)
        assert ev["isBase64Encoded"] is True and base64.b64decode(ev["body"]) == jpeg


def test_cors_origin_is_the_callers_when_allowed_and_never_widened_to_any():
    from shared.api import cors_allow_origin, parse_origins

    allowed = ["https://a.example", "https://b.example/"]
    assert cors_allow_origin("https://b.example", allowed) == "https://b.example"
    assert cors_allow_origin("https://A.example", allowed) == "https://a.example"
    assert cors_allow_origin("https://evil.example", allowed) is None
    assert cors_allow_origin(None, allowed) is None
    assert cors_allow_origin("https://any.example", ["*"]) == "*"
    assert parse_origins(" https://a.example , https://b.example") == ["https://a.example", "https://b.example"]
    assert parse_origins("") == ["*"]


# -- events reach live environments only ------------------------------------------------------------


@pytest.fixture
def stand_in(tmp_path):
    """Two environments running the stand-in function of ``tests/twin_test_handler.py``."""
    gw = _gateway(tmp_path, extra={"_HANDLER": "twin_test_handler.handler",
                                   "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    gw.lambdas.size = 2
    gw.start()
    yield gw
    gw.stop()


def _wait_full(pool, cold_starts: int) -> None:
    deadline = time.monotonic() + 60
    while (pool._idle.qsize() < pool.size or pool.cold_starts < cold_starts) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool._idle.qsize() == pool.size and pool.cold_starts == cold_starts


def test_no_502_after_an_idle_environment_is_killed(stand_in):
    pool = stand_in.lambdas
    for victim in list(pool._all):  # each environment in turn, both before it is handed anything
        victim.proc.kill()
        victim.proc.wait(10)
        statuses = [call_json(stand_in.url + "health")[0] for _ in range(4)]
        assert statuses == [200] * 4
    _wait_full(pool, 4)


def test_an_environment_that_died_unnoticed_never_takes_the_event(stand_in):
    from infra.twin.lambda_pool import NotDelivered

    env = stand_in.lambdas._all[0]
    env.proc.kill()
    env.proc.wait(10)
    with pytest.raises(NotDelivered):  # what the pool redelivers instead of answering 502
        env.hand_over({"httpMethod": "GET", "path": "/health"}, timeout=5)


def test_an_environment_that_dies_while_handling_answers_502(stand_in):
    status, doc = call_json(stand_in.url + "predict", "POST", b"crash",
                            {"Content-Type": "text/plain", "x-api-key": KEY})
    assert status == 502 and doc["error"]["code"] == "INTEGRATION_FAILURE"
    assert call_json(stand_in.url + "health")[0] == 200
    _wait_full(stand_in.lambdas, 3)
