"""Helpers for the inference Lambda's tests: API Gateway REST proxy events, calls, and test images.

Holds no tests itself; the ``test_inference_*`` modules import from it.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PATIENT_NAME = "Testpatient^Secretname"
PATIENT_ID = "PID-7734-SECRET"


def api_event(method: str = "POST", path: str = "/predict", body: bytes | str | None = None,
              content_type: str | None = None, headers: dict[str, str] | None = None,
              query: dict[str, str] | None = None, base64_body: bool | None = None,
              stage: str = "prod") -> dict[str, Any]:
    """A REST API (v1) proxy event as API Gateway sends it for ``{proxy+}`` and the root resource.

    ``bytes`` bodies are base64-encoded with ``isBase64Encoded`` true, as API Gateway does for a
    binary media type; ``str`` bodies are passed as text unless ``base64_body`` says otherwise.
    """
    hdrs = {"Host": "abc123.execute-api.us-east-1.amazonaws.com", "User-Agent": "pytest",
            "X-Forwarded-Proto": "https"}
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    hdrs.update(headers or {})
    if isinstance(body, bytes):
        encoded = base64_body is not False
        text = base64.b64encode(body).decode("ascii") if encoded else body.decode("latin-1")
    else:
        encoded = bool(base64_body)
        text = base64.b64encode(body.encode()).decode("ascii") if (encoded and body is not None) else body
    resource = "/" if path == "/" else "/{proxy+}"
    request_id = str(uuid.uuid4())
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": hdrs,
        "multiValueHeaders": {k: [v] for k, v in hdrs.items()},
        "queryStringParameters": dict(query) if query else None,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": None if path == "/" else {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourceId": "abc1", "resourcePath": resource, "httpMethod": method, "path": f"/{stage}{path}",
            "stage": stage, "requestId": request_id, "extendedRequestId": request_id,
            "requestTime": "26/Nov/2026:10:00:00 +0000", "requestTimeEpoch": 1795687200000,
            "protocol": "HTTP/1.1", "accountId": "123456789012", "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "identity": {"sourceIp": "127.0.0.1", "userAgent": "pytest", "apiKey": None},
        },
        "body": text,
        "isBase64Encoded": encoded,
    }


class Reply:
    def __init__(self, raw: dict[str, Any]):
        self.raw = raw
        self.status: int = raw["statusCode"]
        headers: dict[str, str] = {}
        for k, v in (raw.get("headers") or {}).items():
            headers[k.lower()] = v
        for k, v in (raw.get("multiValueHeaders") or {}).items():
            headers[k.lower()] = ", ".join(v)
        self.headers = headers
        body = raw.get("body") or ""
        self.text = base64.b64decode(body).decode() if raw.get("isBase64Encoded") else body

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def error_code(self) -> str | None:
        return self.json()["error"]["code"]

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.text[:200]!r})"


def call(app_module, event: dict[str, Any]) -> Reply:
    return Reply(app_module.handler(event, FakeContext()))


class FakeContext:
    function_name = "cxr-inference-test"
    function_version = "$LATEST"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:cxr-inference-test"
    log_group_name = "/aws/lambda/cxr-inference-test"
    log_stream_name = "test"

    def __init__(self):
        self.aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


# -- images ---------------------------------------------------------------------------------------


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def png_16bit(arr8: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(arr8.astype(np.uint16) * 257))


def png_palette(arr8: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(arr8).convert("P"))


def png_rgba(arr8: np.ndarray) -> bytes:
    rgba = np.dstack([arr8, arr8, arr8, np.full_like(arr8, 255)])
    rgba[:8, :8, 3] = 0  # a transparent corner
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def dicom_bytes(arr8: np.ndarray | None, *, bits: int = 8, photometric: str = "MONOCHROME2",
                transfer_syntax: str | None = None, pixel_data: bytes | None = None,
                with_pixels: bool = True, window: tuple[float, float] | None = None) -> bytes:
    """A Part 10 DICOM file holding an X-ray, tagged with a patient the tests must never see again.

    MONOCHROME1 stores inverted values, so the picture a viewer shows is the same as the source's.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "20200101"
    ds.InstitutionName = "Secret Children's Hospital"
    ds.Modality = "CR"
    ds.StudyDescription = "CHEST PA"
    if with_pixels:
        assert arr8 is not None
        rows, cols = arr8.shape
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = 12 if bits == 16 else 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if bits == 16:
            values = arr8.astype(np.uint16) * 16 + 8  # 12-bit detector range
            peak = 4095
        else:
            values = arr8.astype(np.uint8)
            peak = 255
        if photometric == "MONOCHROME1":
            values = (peak - values.astype(np.int32)).astype(values.dtype)
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        if pixel_data is not None:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([pixel_data])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(field: str, filename: str, data: bytes, content_type: str = "image/jpeg",
                   extra_fields: dict[str, str] | None = None, boundary: str = "----cxrboundary7MA4YWxkTrZu0gW"
                   ) -> tuple[bytes, str]:
    parts = []
    for name, value in (extra_fields or {}).items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    parts.append(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# -- the app, configured for a test -----------------------------------------------------------------


def configure(monkeypatch, app_module, model_uri: str | None, cache_dir: Path, **settings: Any):
    """Point the imported handler at another model, as a fresh cold start would."""
    from inference_lambda.config import Settings
    from inference_lambda.model_store import ModelStore

    cfg = Settings(model_uri=model_uri, cache_dir=cache_dir, **settings)
    store = ModelStore(cfg)
    monkeypatch.setattr(app_module, "settings", cfg)
    monkeypatch.setattr(app_module, "store", store)
    return store
