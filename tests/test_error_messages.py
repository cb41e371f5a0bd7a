"""Every error message the handler produces is for people: no reprs, addresses, paths or Python names.

The inputs: each kind of file from the field corpus cut short at several places and with bytes
overwritten at several places, plus every malformed request shape the API can receive. Each
answer must be a 4xx (or 503) whose message a person can act on.
"""

from __future__ import annotations

import re

import pytest
from conftest import original_images
from field_corpus import dicom_file, picture, png8, png16, raster_files, scaled
from test_inference_support import api_event, call

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")

INTERNAL = re.compile(
    r"<[^>]*\b(object|class|module|function|built-in)\b[^>]*>"  # reprs
    r"|\b0x[0-9a-fA-F]{4,}"  # addresses
    r"|\b\w+\.py\b|Traceback|File \""  # source locations
    r"|\b[A-Za-z]*(Error|Exception|Warning)\b"  # Python exception names
    r"|\b(pydicom|PIL|libjpeg|numpy|pylibjpeg|openjpeg|powertools)\b"  # module names
    r"|\b[a-z_]+\.[a-z_]+\.[a-z_]+\b"  # dotted module paths
    r"|\\x[0-9a-f]{2}|b'|b\""  # bytes reprs
)


def corrupted(data: bytes) -> list[bytes]:
    n = len(data)
    out = [data[:k] for k in (1, 3, 8, 16, 64, 132, 200, 400, n // 3, n // 2, n - 2) if 0 < k < n]
    for pos in (2, 4, 12, 20, 40, 100, 130, 140, 300, 1000, n // 2, n - 10):
        if 0 <= pos < n - 8:
            out.append(data[:pos] + b"\xff\x00\x13\x37\xde\xad\xbe\xef" + data[pos + 8:])
    return out


@pytest.fixture(scope="module")
def samples():
    pic = picture(original_images()[0], side=96)
    files = {"image/png": [png8(pic), png16(scaled(pic, 12), sbit=12)], "image/jpeg": [], "application/dicom": []}
    for f in raster_files(pic, "x"):
        if f.content_type != "image/png":
            files["image/jpeg"].append(f.data)
    for encoding in ("explicit_le", "implicit_le_no_meta", "rle", "jpeg_lossless_sv1", "jpeg_ls", "jpeg2000"):
        files["application/dicom"].append(dicom_file(pic, encoding, "MONOCHROME1", 12, "voi_lut_sequence")[0])
    files["image/jpeg"].append(original_images()[0].read_bytes()[:5000])
    return files


def requests(samples) -> list[dict]:
    events = []
    for media_type, datas in samples.items():
        for data in datas:
            for bad in corrupted(data):
                for declared in (media_type, "image/png", "application/dicom"):
                    events.append(api_event(body=bad, content_type=declared))
    events += [
        api_event(body=b"", content_type="image/png"),
        api_event(body="hello", content_type="text/plain"),
        api_event(body='{"image_base64": 3}', content_type="application/json"),
        api_event(body='{"image_base64": "!!"}', content_type="application/json"),
        api_event(body="{not json", content_type="application/json"),
        api_event(body='{"image_base64": "data:image/png;base64,AAAA"}', content_type="application/json"),
        api_event(body=b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                  content_type="multipart/form-data; boundary=x"),
        api_event(body=b"abc", content_type="multipart/form-data"),
        api_event(body=b"\x00\x01\x02\x03" * 100, content_type="image/jpeg"),
        api_event(body=b"II*\x00" + b"\x00" * 100, content_type="image/png"),
        api_event(body=b"abc", content_type="image/\x01weird"),
        api_event(body=b"abc", content_type=None),
        api_event(body="not base64!", content_type="image/png", base64_body=True),
        api_event("GET", "/nowhere<script>"),
        api_event("DELETE", "/predict"),
    ]
    return events


def test_no_error_message_carries_internal_text(inference_app, samples):
    seen: dict[str, int] = {}
    for event in requests(samples):
        reply = call(inference_app, event)
        if reply.status == 200:
            continue
        assert 400 <= reply.status < 500, reply
        message = reply.json()["error"]["message"]
        assert message and not INTERNAL.search(message), message
        seen[message] = reply.status
    assert len(seen) >= 15  # the corruptions reach many different checks
