"""DICOM answers to ``POST /predict``: a Structured Report in the input's study, and the heatmap.

Asked for with the ``Accept`` header, for a DICOM input only (anything else gets 406):

- ``application/dicom``: one Comprehensive SR (PS3.3 A.35.3), TID 1500 Measurement Report with
  one TID 1501 measurement group: the finding as a qualitative evaluation (SNOMED CT 233604007
  Pneumonia: 52101004 Present / 272519000 Absent), the probability (DCM 122157, UCUM "1"), the
  algorithm identification (TID 4019: model name, version, parameters ``threshold=`` and
  ``archive_sha256=``), the input image as source, and the statement that the result is not for
  diagnostic use (DCM 121106 Comment).
- ``multipart/related; type="application/dicom"``: the SR, then the heatmap as an RGB Secondary
  Capture image (PS3.3 A.8.1) in the same series (PS3.18 8.6.1.2 framing).

Both objects are in the input's study (Study Instance UID and the patient and study modules
copied from it), in one new series, with the model as Contributing Equipment (DCM 109102
Processing Equipment; Software Versions: model version and archive SHA-256). Built with
highdicom; no identifier read here is ever logged.

A Lambda response carries at most 6 MB, base64-encoded for binary bodies (4/3 larger):
:data:`MAX_RESPONSE_BYTES` of DICOM leaves room for the headers; a larger answer is refused (406).
"""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.api import DICOM_MULTIPART_MEDIA_TYPE

from .errors import ApiError

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_RELATED = DICOM_MULTIPART_MEDIA_TYPE
SR_ONLY = "sr"
SR_AND_HEATMAP = "sr+heatmap"
MAX_RESPONSE_BYTES = 4_500_000  # the request limit's reasoning (inference_lambda/inputs.py), reversed

MANUFACTURER = "cxr-pneumonia"
NOT_FOR_DIAGNOSTIC_USE = ("NOT FOR DIAGNOSTIC USE. Research and teaching only: this result must not be used to "
                          "diagnose, treat or triage anyone.")
SR_SERIES_DESCRIPTION = "Pneumonia classifier result (not for diagnostic use)"
SERIES_NUMBER = 9901  # a high number, after the modality's own series
# The input's identifying attributes that highdicom copies and that a modality may have left out
# (type 2 in the SR's patient and study modules): present but empty in the copy it is given.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED = {"StudyInstanceUID": "Study Instance UID", "SeriesInstanceUID": "Series Instance UID",
             "SOPInstanceUID": "SOP Instance UID", "SOPClassUID": "SOP Class UID"}
_ACCEPT_ITEM = re.compile(r"\s*([^;,\s]+)\s*((?:;\s*[^;,=\s]+\s*=\s*(?:\"[^\"]*\"|[^;,\s]*)\s*)*)")


class NotAcceptable(ApiError):
    code = "not_acceptable"
    http_status = 406


@dataclass(frozen=True)
class Result:
    """What the SR records, from the prediction and the model that made it."""

    pneumonia: bool
    probability: float  # of the positive class, 0..1
    threshold: float  # decision threshold on ``probability``, 0..1
    model_name: str
    model_version: str
    archive_sha256: str | None  # of model.tar.gz; None for a model served from a folder


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for m in _ACCEPT_ITEM.finditer(accept or ""):
        params = {}
        for p in re.finditer(r";\s*([^;,=\s]+)\s*=\s*(\"[^\"]*\"|[^;,\s]*)", m.group(2) or ""):
            params[p.group(1).lower()] = p.group(2).strip('"').lower()
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        out.append((m.group(1).lower(), params, q))
    return out


def requested(accept: str | None) -> str | None:
    """Which DICOM answer an ``Accept`` header asks for: :data:`SR_ONLY`, :data:`SR_AND_HEATMAP` or
    None (JSON, the default: also for no header, ``*/*`` or JSON ranked at least as high)."""
    best: tuple[float, str | None] = (0.0, None)
    json_q = 0.0
    for media, params, q in _media_ranges(accept or ""):
        if media in ("application/json", "*/*", "application/*"):
            json_q = max(json_q, q)
        elif media == DICOM_MEDIA_TYPE and q > best[0]:
            best = (q, SR_ONLY)
        elif media == MULTIPART_RELATED and params.get("type") == DICOM_MEDIA_TYPE and q > best[0]:
            best = (q, SR_AND_HEATMAP)
    return best[1] if best[0] > json_q else None


def refuse_non_dicom(input_format: str) -> NotAcceptable:
    return NotAcceptable(f"a DICOM answer (Accept: {DICOM_MEDIA_TYPE}) is made only for a DICOM input, and this "
                         f"input is {input_format.upper()}; send the DICOM file, or accept application/json")


def _source_header(data: bytes):
    import pydicom

    from shared.imaging import _quiet_pydicom

    with _quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    missing = [label for key, label in _REQUIRED.items() if not str(ds.get(key, "") or "").strip()]
    if missing:
        raise NotAcceptable(f"the DICOM input has no {', '.join(missing)}, so no result can be placed in its "
                            "study; send the file as the modality wrote it, or accept application/json")
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, None)
    return ds


def _equipment(result: Result):
    from highdicom.base_content import ContributingEquipment
    from pydicom.sr.codedict import codes

    versions = [result.model_version[:64]] + ([result.archive_sha256] if result.archive_sha256 else [])
    return ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=result.model_name[:64], software_versions=versions,
        contribution_description="pneumonia classification, not for diagnostic use")


def structured_report(source, result: Result, series_uid: str, instance_number: int = 1):
    """The Comprehensive SR for ``result`` about the image ``source`` (a pydicom Dataset)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name[:64], version=result.model_version[:64],
        parameters=[f"threshold={result.threshold:.6g}"]
        + ([f"archive_sha256={result.archive_sha256}"] if result.archive_sha256 else []))
    pneumonia = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia classification"),
        finding_type=pneumonia,
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=float(result.probability),
                                        unit=hd.sr.CodedConcept("1", "UCUM", "no units"), algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=pneumonia, value=codes.SCT.Present if result.pneumonia else codes.SCT.Absent)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(result), name=result.model_name[:64], manufacturer_name=MANUFACTURER,
            model_name=result.model_version[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group],
    )
    root = report[0]
    root.ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=NOT_FOR_DIAGNOSTIC_USE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION, is_complete=True,
        contributing_equipment=[_equipment(result)])
    return sr


def _device_uid(result: Result) -> str:
    """A UID naming the model (the same for the same archive), from its SHA-256 or name and version."""
    key = result.archive_sha256 or f"{result.model_name}/{result.model_version}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, key).int}"


def heatmap_image(source, result: Result, png: bytes, series_uid: str, instance_number: int = 2):
    """The heatmap overlay (PNG from :func:`inference_lambda.heatmap.overlay_png`) as an RGB Secondary Capture."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
    orientation = tuple(source.get("PatientOrientation") or ()) or ("L", "F")  # PA frontal view when unknown
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        patient_orientation=orientation[:2], transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_equipment(result)])
    sc.SeriesDescription = SR_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.Laterality = source.get("Laterality") or None  # type 2C in General Series: empty for an unpaired part
    sc.DerivationDescription = f"class activation map of {result.model_name[:40]}, not for diagnostic use"
    sc.SourceImageSequence = [_reference(source)]
    return sc


def _reference(source):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def encode(ds) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def result_objects(data: bytes, result: Result, heatmap_png: bytes | None = None) -> list:
    """The SR (and, with ``heatmap_png``, the Secondary Capture) for the DICOM input ``data``.

    Raises :class:`NotAcceptable` when the input lacks the UIDs that place a result in its study.
    """
    from pydicom.uid import generate_uid

    source = _source_header(data)
    series_uid = generate_uid()
    objects = [structured_report(source, result, series_uid)]
    if heatmap_png is not None:
        objects.append(heatmap_image(source, result, heatmap_png, series_uid))
    return objects


def response_body(kind: str, objects: list) -> tuple[bytes, str]:
    """(body, Content-Type) of the answer: one Part 10 file, or a ``multipart/related`` of them.

    Raises :class:`NotAcceptable` when the body would be over :data:`MAX_RESPONSE_BYTES`.
    """
    files = [encode(ds) for ds in objects]
    if kind == SR_ONLY:
        body, media = files[0], DICOM_MEDIA_TYPE
    else:
        boundary = uuid.uuid4().hex
        parts = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                         for f in files)
        body = parts + b"--" + boundary.encode() + b"--\r\n"
        media = f'{MULTIPART_RELATED}; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
    if len(body) > MAX_RESPONSE_BYTES:
        raise NotAcceptable(f"the DICOM answer is {len(body):,} bytes, over the response limit of "
                            f"{MAX_RESPONSE_BYTES:,} bytes; accept {DICOM_MEDIA_TYPE} (the report without "
                            "the heatmap) or application/json")
    return body, media
