"""DICOM answers: ``Accept: application/dicom`` gets a Structured Report in the input's study,
``multipart/related; type="application/dicom"`` adds the heatmap as a Secondary Capture; every
object the service writes passes ``dciodvfy`` (dicom3tools) with no error.

Inputs are DX files made from the originals (tests/field_corpus.py) with the study, series and
patient attributes a modality writes.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess

import pydicom
import pytest
import test_field_files
from conftest import original_images
from field_corpus import dicom_file, picture, png8
from test_inference_support import PATIENT_ID, PATIENT_NAME, FakeContext, Reply, api_event

from inference_lambda import dicom_results

app = test_field_files.app  # the fixture: the handler serving the reference model
pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY_UID = "1.2.826.0.1.3680043.8.498.7734.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.7734.1.2"
DCIODVFY = shutil.which("dciodvfy")
# CI installs dicom3tools (.ci/run); only a hand-run pytest without it may skip.
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None and os.environ.get("CI") != "true",
                                    reason="dciodvfy (Debian package dicom3tools) is not installed")


def clinical_dicom(pic, encoding: str = "explicit_le", photometric: str = "MONOCHROME2") -> bytes:
    """A DX file as a modality writes it: study, series and patient attributes included."""
    data, _ = dicom_file(pic, encoding, photometric, 12, "none")
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.PatientSex = "20200101", "F"
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "ACC-55", "S1", "20261201", "101500"
    ds.ViewPosition, ds.BodyPartExamined = "PA", "CHEST"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=encoding != "implicit_le_no_meta")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pics():
    return [picture(p, 384) for p in original_images()[::3]]  # one NORMAL, one PNEUMONIA


class Answer(Reply):
    """A handler reply whose body may be binary (Reply decodes base64 bodies as text)."""

    def __init__(self, raw):
        if raw.get("isBase64Encoded"):
            super().__init__({**raw, "body": "", "isBase64Encoded": False})
            self.raw = raw
        else:
            super().__init__(raw)


def post(app, data: bytes, accept: str | None, content_type: str = "application/dicom") -> Answer:
    event = api_event("POST", "/predict", body=data, content_type=content_type,
                      headers={"Accept": accept} if accept else None)
    return Answer(app.handler(event, FakeContext()))


def body_bytes(reply) -> bytes:
    assert reply.raw["isBase64Encoded"] is True, "a binary answer must be base64 for API Gateway"
    return base64.b64decode(reply.raw["body"])


def parts(reply) -> list[bytes]:
    media = reply.headers["content-type"]
    assert media.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = media.rsplit("boundary=", 1)[1].encode()
    raw = body_bytes(reply)
    assert raw.endswith(b"--" + boundary + b"--\r\n")
    chunks = raw.split(b"--" + boundary)[1:-1]
    out = []
    for chunk in chunks:
        head, payload = chunk.split(b"\r\n\r\n", 1)
        assert b"Content-Type: application/dicom" in head
        out.append(payload[:-2])  # the CRLF before the next boundary
    return out


def content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def meanings(ds) -> dict[str, list]:
    found: dict[str, list] = {}
    for item in content_items(ds):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "CODE":
            value = (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        elif item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            value = item.TextValue
        else:
            continue
        found.setdefault(name, []).append(value)
    return found


def dciodvfy_errors(data: bytes, tmp_path) -> list[str]:
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    run = subprocess.run([DCIODVFY or "dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_sr_in_the_input_study_with_the_finding(app, pics, capsys):
    data = clinical_dicom(pics[1])
    as_json = post(app, data, None)
    assert as_json.status == 200 and as_json.headers["content-type"].startswith("application/json")
    expected = as_json.json()
    capsys.readouterr()

    reply = post(app, data, "application/dicom")
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(body_bytes(reply)))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.SeriesInstanceUID not in (SERIES_UID, "")
    assert (str(sr.PatientName), sr.PatientID, sr.PatientBirthDate, sr.PatientSex) == (
        PATIENT_NAME, PATIENT_ID, "20200101", "F")
    assert sr.AccessionNumber == "ACC-55"
    source = pydicom.dcmread(io.BytesIO(data))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == STUDY_UID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID

    items = meanings(sr)
    positive = expected["label"] == "PNEUMONIA"
    assert items["Pneumonia"] == [("52101004" if positive else "272519000", "SCT")]
    assert items["Finding"] == [("233604007", "SCT")]
    assert items["Probability"] == [pytest.approx(expected["probability"], abs=1e-6)]
    params = items["Algorithm Parameters"]
    assert f"threshold={expected['threshold']:.6g}" in params
    sha = app.store.get().sha256
    assert len(sha) == 64 and f"archive_sha256={sha}" in params
    assert set(items["Algorithm Version"]) == {expected["model"]["version"]}
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in items["Comment"])
    [equipment] = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == dicom_results.MANUFACTURER]
    assert equipment.ManufacturerModelName == "cxr-inference efficientnet_lite0"
    assert list(equipment.SoftwareVersions) == [expected["model"]["version"], sha]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    logs = capsys.readouterr()
    for secret in (PATIENT_ID, PATIENT_NAME.split("^")[1], STUDY_UID, source.SOPInstanceUID):
        assert secret not in logs.out + logs.err


def test_multipart_adds_the_heatmap_in_the_same_series(app, pics):
    reply = post(app, clinical_dicom(pics[0], photometric="MONOCHROME1"), 'multipart/related; type="application/dicom"')
    assert reply.status == 200, reply
    sr_bytes, sc_bytes = parts(reply)
    sr, sc = pydicom.dcmread(io.BytesIO(sr_bytes)), pydicom.dcmread(io.BytesIO(sc_bytes))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.SeriesInstanceUID == sr.SeriesInstanceUID and sc.StudyInstanceUID == STUDY_UID
    assert sc.PatientID == PATIENT_ID and sc.SOPInstanceUID != sr.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB"
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) == 384
    assert rgb.std(axis=2).mean() > 5  # coloured: the map is drawn over the X-ray


@pytest.mark.parametrize("accept, wants", [
    (None, None), ("*/*", None), ("application/json", None), ("application/dicom", "sr"),
    ("application/json;q=0.5, application/dicom", "sr"), ("application/dicom;q=0.2, application/json", None),
    ('multipart/related; type="application/dicom"', "sr+heatmap"), ("multipart/related", None),
    ('application/dicom;q=0.4, multipart/related; type="application/dicom"; q=0.9', "sr+heatmap"),
])
def test_accept_negotiation(accept, wants):
    assert dicom_results.requested(accept) == wants


def test_non_dicom_input_gets_406(app, pics):
    reply = post(app, png8(pics[0]), "application/dicom", content_type="image/png")
    assert reply.status == 406, reply
    assert reply.error_code == "not_acceptable"
    assert "only for a DICOM input" in reply.json()["error"]["message"]
    assert "PNG" in reply.json()["error"]["message"]


def test_dicom_without_study_uid_gets_406(app, pics):
    data, _ = dicom_file(pics[0], "explicit_le", "MONOCHROME2", 12, "none")  # no study or series UID
    reply = post(app, data, "application/dicom")
    assert reply.status == 406, reply
    message = reply.json()["error"]["message"]
    assert "Study Instance UID" in message and "Series Instance UID" in message
    assert post(app, data, None).status == 200  # JSON still answers


def test_answer_over_the_response_limit_is_refused(app, pics, monkeypatch):
    data = clinical_dicom(pics[0])
    monkeypatch.setattr(dicom_results, "MAX_RESPONSE_BYTES", 20_000)
    reply = post(app, data, 'multipart/related; type="application/dicom"')
    assert reply.status == 406, reply
    assert "over the response limit of 20,000 bytes" in reply.json()["error"]["message"]


def test_binary_media_types_cover_the_answers():
    from shared.api import BINARY_MEDIA_TYPES

    assert "application/dicom" in BINARY_MEDIA_TYPES and "multipart/related" in BINARY_MEDIA_TYPES


@needs_dciodvfy
@pytest.mark.parametrize("encoding", ["explicit_le", "implicit_le_no_meta", "jpeg2000"])
def test_every_written_object_passes_dciodvfy(app, pics, encoding, tmp_path):
    data = clinical_dicom(pics[1], encoding=encoding)
    content_type = "application/dicom+octet-stream" if encoding == "implicit_le_no_meta" else "application/dicom"
    reply = post(app, data, 'multipart/related; type="application/dicom"', content_type=content_type)
    assert reply.status == 200, reply
    objects = parts(reply)
    sr_only = post(app, data, "application/dicom", content_type=content_type)
    objects.append(body_bytes(sr_only))
    assert len(objects) == 3
    for obj in objects:
        assert dciodvfy_errors(obj, tmp_path) == []
