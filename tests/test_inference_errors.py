"""Bad input to the inference Lambda: each gets its 4xx and code, never a 5xx, and nothing leaks."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import warnings
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_inference_support import (
    PATIENT_ID,
    PATIENT_NAME,
    api_event,
    call,
    configure,
    dicom_bytes,
    gray,
    multipart_body,
)

from inference_lambda.inputs import MAX_BODY_BYTES, MAX_IMAGE_BYTES

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")


def png_with_header(width: int, height: int, rows: int = 4) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries a few KB: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((width + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def expect(reply, status: int, code: str):
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


@pytest.fixture(scope="module")
def jpeg(originals) -> bytes:
    return originals[0].read_bytes()


# -- bodies and content types -------------------------------------------------------------------


def test_empty_body(inference_app):
    for body in (None, "", b""):
        expect(call(inference_app, api_event(body=body, content_type="image/jpeg")), 400, "empty_body")
    expect(call(inference_app, api_event(body=None)), 400, "empty_body")


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/octet-stream", "application/xml",
                                   "image/gif", "application/x-www-form-urlencoded", "garbage;;;"])
def test_wrong_or_missing_content_type_is_415(inference_app, jpeg, ctype):
    expect(call(inference_app, api_event(body=jpeg, content_type=ctype)), 415, "unsupported_media_type")


def test_text_is_not_an_image(inference_app):
    expect(call(inference_app, api_event(body="hello, this is text", content_type="text/plain")),
           415, "unsupported_media_type")
    expect(call(inference_app, api_event(body="hello, this is text", content_type="image/jpeg")),
           415, "unsupported_media_type")
    expect(call(inference_app, api_event(body=b"\x00\x01\x02 random binary" * 10, content_type="image/png")),
           415, "unsupported_media_type")


def test_truncated_and_corrupt_images(inference_app, jpeg):
    expect(call(inference_app, api_event(body=jpeg[: len(jpeg) // 3], content_type="image/jpeg")), 400, "corrupt_image")
    expect(call(inference_app, api_event(body=jpeg[:200], content_type="image/jpeg")), 400, "corrupt_image")
    png = png_with_header(512, 512, rows=512)
    expect(call(inference_app, api_event(body=png[:60], content_type="image/png")), 400, "corrupt_image")


def test_png_decompression_bomb_and_absurd_dimensions(inference_app):
    bomb = png_with_header(40_000, 40_000)
    assert len(bomb) < 10_000
    expect(call(inference_app, api_event(body=bomb, content_type="image/png")), 400, "image_dimensions")
    expect(call(inference_app, api_event(body=png_with_header(100_000, 100_000), content_type="image/png")),
           400, "image_dimensions")
    expect(call(inference_app, api_event(body=png_with_header(20_000, 64), content_type="image/png")),
           400, "image_dimensions")
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    expect(call(inference_app, api_event(body=buf.getvalue(), content_type="image/png")), 400, "image_dimensions")


def test_invalid_base64(inference_app):
    event = api_event(body="this is not base64!!", content_type="image/jpeg")
    event["isBase64Encoded"] = True
    expect(call(inference_app, event), 400, "invalid_base64")
    expect(call(inference_app, api_event(body=json.dumps({"image_base64": "@@@not-base64@@@"}),
                                         content_type="application/json")), 400, "invalid_base64")
    expect(call(inference_app, api_event(body=json.dumps({"image_base64": "QUJD\u00e9"}),
                                         content_type="application/json")), 400, "invalid_base64")


@pytest.mark.parametrize("body,code", [
    ("{not json", "invalid_json"),
    ("", "empty_body"),
    ("[1, 2, 3]", "missing_image_base64"),
    ('"a string"', "missing_image_base64"),
    ('{"image": "abc"}', "missing_image_base64"),
    ('{"image_base64": 12}', "missing_image_base64"),
    ('{"image_base64": null}', "missing_image_base64"),
    ('{"image_base64": ""}', "empty_image"),
    ("[" * 100_000, "invalid_json"),
    ('{"image_base64": "aGk=", "n": ' + "9" * 5_000 + "}", "invalid_json"),  # past int's digit limit
])
def test_bad_json(inference_app, body, code):
    expect(call(inference_app, api_event(body=body, content_type="application/json")), 400, code)


def test_json_with_text_instead_of_an_image(inference_app):
    b64 = base64.b64encode(b"just some words, not an image").decode()
    expect(call(inference_app, api_event(body=json.dumps({"image_base64": b64}), content_type="application/json")),
           415, "unsupported_media_type")


def test_bad_multipart(inference_app, jpeg):
    body, ctype = multipart_body("upload", "xray.jpeg", jpeg)
    expect(call(inference_app, api_event(body=body, content_type=ctype)), 400, "missing_file_field")
    expect(call(inference_app, api_event(body=body, content_type="multipart/form-data")), 400, "invalid_multipart")
    body, ctype = multipart_body("file", "xray.jpeg", jpeg)
    expect(call(inference_app, api_event(body=body[: len(body) // 2], content_type=ctype)), 400, "invalid_multipart")
    expect(call(inference_app, api_event(body=b"no boundary anywhere", content_type=ctype)), 400, "invalid_multipart")
    body, ctype = multipart_body("file", "notes.txt", b"plain words", content_type="text/plain")
    expect(call(inference_app, api_event(body=body, content_type=ctype)), 415, "unsupported_media_type")


# -- size limits --------------------------------------------------------------------------------


def test_limits_fit_what_lambda_can_receive():
    # The base64 form of the largest accepted image, plus room for headers, must fit a 6 MB event.
    assert 4 * -(-MAX_IMAGE_BYTES // 3) + 200_000 <= 6 * 1024 * 1024
    assert MAX_BODY_BYTES <= 6 * 1024 * 1024


def test_body_over_the_raw_limit_is_413(inference_app):
    event = api_event(body="A" * (MAX_BODY_BYTES + 4), content_type="image/jpeg")
    event["isBase64Encoded"] = True
    expect(call(inference_app, event), 413, "payload_too_large")


def test_image_over_the_decoded_limit_is_413(inference_app, jpeg):
    big = jpeg + b"\x00" * (MAX_IMAGE_BYTES + 60_000 - len(jpeg))
    event = api_event(body=big, content_type="image/jpeg")
    assert len(event["body"]) <= MAX_BODY_BYTES  # passes the first check, fails the second
    expect(call(inference_app, event), 413, "payload_too_large")
    b64 = base64.b64encode(big).decode()
    expect(call(inference_app, api_event(body=json.dumps({"image_base64": b64}), content_type="application/json")),
           413, "payload_too_large")
    body, ctype = multipart_body("file", "big.jpeg", big)
    expect(call(inference_app, api_event(body=body, content_type=ctype)), 413, "payload_too_large")


def test_image_at_the_limit_is_accepted(inference_app, originals):
    # A 16-bit uncompressed DICOM of a full-size original is the largest realistic input.
    arr = gray(max(originals, key=lambda p: Image.open(p).size[0] * Image.open(p).size[1]))
    data = dicom_bytes(arr, bits=16)
    assert 4_000_000 < len(data) <= MAX_IMAGE_BYTES
    assert call(inference_app, api_event(body=data, content_type="application/dicom")).status == 200


# -- DICOM --------------------------------------------------------------------------------------


def test_dicom_without_pixel_data(inference_app):
    data = dicom_bytes(None, with_pixels=False)
    body = expect(call(inference_app, api_event(body=data, content_type="application/dicom")), 415, "unsupported_dicom")
    assert "pixel data" in body["error"]["message"]


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"])  # JPEG 2000, JPEG-LS
def test_dicom_with_compressed_syntax_and_garbage_data(inference_app, originals, syntax):
    arr = gray(originals[0])[:256, :256]
    data = dicom_bytes(arr, transfer_syntax=syntax, pixel_data=b"\xff\x4f\xff\x51 not a codestream " * 20)
    expect(call(inference_app, api_event(body=data, content_type="application/dicom")), 415, "unsupported_dicom")


def test_truncated_dicom(inference_app, originals):
    data = dicom_bytes(gray(originals[0]))
    expect(call(inference_app, api_event(body=data[: len(data) // 2], content_type="application/dicom")),
           400, "corrupt_image")
    # Cut inside the header: what is left has no pixel data element at all.
    expect(call(inference_app, api_event(body=data[:140], content_type="application/dicom")), 415, "unsupported_dicom")


# -- routes and the model -------------------------------------------------------------------------


def test_unknown_route_is_404(inference_app):
    for method, path in (("GET", "/nope"), ("POST", "/predict/extra"), ("GET", "/index.html")):
        expect(call(inference_app, api_event(method, path)), 404, "not_found")


def test_wrong_method_is_405_with_allow(inference_app):
    for method, path, allow in (("GET", "/predict", "POST"), ("PUT", "/predict", "POST"),
                                ("POST", "/health", "GET"), ("DELETE", "/", "GET")):
        reply = call(inference_app, api_event(method, path))
        expect(reply, 405, "method_not_allowed")
        assert reply.headers["allow"] == allow


def test_not_an_api_gateway_event(inference_app):
    raw = inference_app.handler({"hello": "world"}, None)
    assert raw["statusCode"] == 400 and json.loads(raw["body"])["error"]["code"] == "bad_request"


@pytest.mark.parametrize("uri", [None, "/nonexistent/model/folder", "s3://"])
def test_model_that_cannot_load_is_503_with_retry_after(monkeypatch, inference_app, tmp_path, jpeg, uri):
    configure(monkeypatch, inference_app, uri, tmp_path, retry_seconds=7)
    for event in (api_event(body=jpeg, content_type="image/jpeg"), api_event("GET", "/health")):
        reply = call(inference_app, event)
        expect(reply, 503, "model_unavailable")
        assert reply.headers["retry-after"] == "7"
    # The page does not need the model; bad input still gets its 4xx.
    assert call(inference_app, api_event("GET", "/")).status == 200
    expect(call(inference_app, api_event(body="text", content_type="text/plain")), 415, "unsupported_media_type")


def test_broken_bundle_is_503_then_recovers(monkeypatch, inference_app, tiny_bundle, tmp_path, jpeg):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text("{not json")
    store = configure(monkeypatch, inference_app, str(broken), tmp_path / "c", retry_seconds=0)
    reply = call(inference_app, api_event(body=jpeg, content_type="image/jpeg"))
    expect(reply, 503, "model_unavailable")
    assert "bundle.json is not valid JSON" in store.last_error
    assert str(broken) not in reply.text  # paths and buckets stay in the logs
    configure(monkeypatch, inference_app, str(tiny_bundle), tmp_path / "c")
    assert call(inference_app, api_event(body=jpeg, content_type="image/jpeg")).status == 200


def test_model_file_onnx_runtime_cannot_read_is_503(monkeypatch, inference_app, tiny_bundle, tmp_path, jpeg):
    import shutil

    broken = tmp_path / "garbage-onnx"
    shutil.copytree(tiny_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph" * 10)
    meta = json.loads((broken / "bundle.json").read_text())
    meta.pop("onnx_sha256")
    (broken / "bundle.json").write_text(json.dumps(meta))
    configure(monkeypatch, inference_app, str(broken), tmp_path / "c")
    expect(call(inference_app, api_event(body=jpeg, content_type="image/jpeg")), 503, "model_unavailable")


def test_failed_load_is_not_retried_before_retry_after(monkeypatch, inference_app, tmp_path, jpeg):
    store = configure(monkeypatch, inference_app, str(tmp_path / "missing"), tmp_path, retry_seconds=60)
    attempts = []
    real = store._load_location
    monkeypatch.setattr(store, "_load_location", lambda *a, **k: attempts.append(1) or real(*a, **k))
    for _ in range(3):
        expect(call(inference_app, api_event(body=jpeg, content_type="image/jpeg")), 503, "model_unavailable")
    assert len(attempts) == 1


def test_unexpected_failure_is_a_json_500_without_details(monkeypatch, inference_app, jpeg):
    model = inference_app.store.get()

    def explode(*_a, **_k):
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(model.predictor, "predict", explode)
    reply = call(inference_app, api_event(body=jpeg, content_type="image/jpeg"))
    expect(reply, 500, "internal_error")
    assert "secret internal detail" not in reply.text


# -- nothing sensitive in logs or responses ---------------------------------------------------------


def test_logs_and_responses_never_hold_image_bytes_or_patient_tags(inference_app, originals, capfd):
    from inference_lambda.config import SERVICE_NAME

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(inference_app.logger.registered_formatter)
    service_logger, root = logging.getLogger(SERVICE_NAME), logging.getLogger()
    levels = (service_logger.level, root.level)
    for lg in (service_logger, root):  # root: what libraries (pydicom, PIL) log reaches Lambda's log too
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    arr = gray(originals[0])
    jpeg = originals[0].read_bytes()
    b64 = base64.b64encode(jpeg).decode()
    dicoms = [dicom_bytes(arr, bits=16, photometric="MONOCHROME1"), dicom_bytes(None, with_pixels=False),
              dicom_bytes(arr[:256, :256], transfer_syntax="1.2.840.10008.1.2.4.90", pixel_data=b"junk" * 50)]
    # A malformed file whose transfer syntax holds the patient's name: pydicom warns quoting the value.
    dicoms.append(dicom_bytes(arr[:64, :64]).replace(b"1.2.840.10008.1.2.1\x00", PATIENT_NAME.encode()[:20], 1))
    full = dicoms[0]
    events = [
        api_event(body=jpeg, content_type="image/jpeg", query={"explain": "1"}),
        api_event(body=json.dumps({"image_base64": b64}), content_type="application/json"),
        api_event(body=json.dumps({"image_base64": b64[:-7] + "!!"}), content_type="application/json"),
        api_event(body=json.dumps({"image_base64": b64, "name": PATIENT_NAME}), content_type="text/plain"),
        api_event(body=jpeg[: len(jpeg) // 2], content_type="image/jpeg"),
        *[api_event(body=d, content_type="application/dicom", query={"explain": "1"}) for d in dicoms],
        api_event(body=full[: len(full) - 1000], content_type="application/dicom"),
        api_event(body=multipart_body("file", f"{PATIENT_NAME}.dcm", full, "application/dicom")[0],
                  content_type=multipart_body("file", "x", b"")[1]),
    ]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            replies = [call(inference_app, e) for e in events]
    finally:
        for lg, level in zip((service_logger, root), levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    out, err = capfd.readouterr()
    logs = stream.getvalue() + out + err + "\n".join(str(w.message) for w in caught)
    assert '"message":"prediction"' in logs.replace(" ", "") and "request rejected" in logs
    assert [r.status for r in replies][:2] == [200, 200]
    secrets = [PATIENT_NAME, "Testpatient", "Secretna", PATIENT_ID, "Secret Children", "20200101"]
    chunks = [b64[i:i + 40] for i in range(0, len(b64), len(b64) // 8)]
    chunks += [base64.b64encode(full[i:i + 300]).decode()[:40] for i in range(1000, len(full), len(full) // 8)]
    for text in [logs] + [r.text for r in replies]:
        for secret in secrets:
            assert secret not in text
    for chunk in chunks:
        assert chunk not in logs
    for marker in ("JFIF", "DICM", "\\u00ff\\u00d8", "IHDR"):
        assert marker not in logs


# -- fuzz -----------------------------------------------------------------------------------------


CONTENT_TYPES = ["image/jpeg", "image/png", "application/dicom", "application/json", "multipart/form-data",
                 "multipart/form-data; boundary=xyz", "text/plain", "application/octet-stream", "", "image/*"]
PREFIXES = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\x00" * 128 + b"DICM", b"--xyz\r\n", b"{\"image_base64\": \""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["image_base64", "file", "x"]),
                                                                inner, max_size=3),
    max_leaves=10,
)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["bytes", "json", "text"]))
    if kind == "bytes":
        body: bytes | str = draw(st.sampled_from(PREFIXES)) + draw(st.binary(max_size=1024))
    elif kind == "json":
        body = json.dumps(draw(json_values))
    else:
        body = draw(st.text(max_size=300))
    ctype = draw(st.sampled_from(CONTENT_TYPES) | st.text(max_size=40))
    method, path = draw(st.sampled_from([("POST", "/predict")] * 6 + [("GET", "/health"), ("GET", "/"),
                                                                        ("PATCH", "/predict"), ("GET", "/x")]))
    query = draw(st.sampled_from([None, {"explain": "1"}, {"explain": "nope"}]))
    return api_event(method, path, body=body, content_type=ctype or None, query=query,
                     base64_body=draw(st.booleans()) if isinstance(body, str) else None)


@settings(max_examples=int(__import__("os").environ.get("FUZZ_N", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=requests())
def test_fuzz_handler_never_answers_5xx(inference_app, event):
    reply = call(inference_app, event)
    assert reply.status < 500, reply
    if reply.status != 200:
        expect(reply, reply.status, reply.json()["error"]["code"])


@st.composite
def mutated_images(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def seed_images(originals):
    arr = gray(originals[0])[200:296, 300:396]
    buf_j, buf_p = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(buf_j, format="JPEG")
    Image.fromarray(arr).save(buf_p, format="PNG")
    return [buf_j.getvalue(), buf_p.getvalue(), dicom_bytes(arr), dicom_bytes(arr, bits=16, photometric="MONOCHROME1"),
            dicom_bytes(arr, window=(100.0, 200.0))]


def test_fuzz_mutated_images_never_answer_5xx(inference_app, seed_images):
    ctypes = st.sampled_from(["image/jpeg", "image/png", "application/dicom"])

    @settings(max_examples=int(__import__("os").environ.get("FUZZ_N", 150)), deadline=None)
    @given(data=mutated_images(seed_images), ctype=ctypes)
    def run(data, ctype):
        reply = call(inference_app, api_event(body=data, content_type=ctype, query={"explain": "1"}))
        assert reply.status < 500, reply
        if reply.status != 200:
            expect(reply, reply.status, reply.json()["error"]["code"])

    run()
