"""Files as clinical systems write them, through the handler with the reference model.

Each file must score like the picture its viewer shows sent as an 8-bit PNG (within 1e-3), or
be refused with the exact status and code. The inputs are made from the originals
(tests/field_corpus.py); the first tests are the reported cases, the last runs the whole grid.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, original_images
from field_corpus import corpus, dicom_file, picture, png8, png16, scaled
from test_inference_support import api_event, call

from shared.api import BINARY_MEDIA_TYPES
from shared.imaging import SUPPORTED_MEDIA_TYPES

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")
REFERENCE = ROOT / "models" / "reference" / "model.tar.gz"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from inference_lambda import app as app_module
    from inference_lambda.config import Settings
    from inference_lambda.model_store import ModelStore

    settings = Settings(model_uri=str(REFERENCE), cache_dir=tmp_path_factory.mktemp("reference-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app_module, "settings", settings)
        mp.setattr(app_module, "store", ModelStore(settings))
        yield app_module


def send(app, data: bytes, content_type: str):
    """POST the bytes as API Gateway delivers them: base64 only for a binary media type."""
    binary = content_type.split(";")[0].strip().lower() in BINARY_MEDIA_TYPES
    body = data if binary else data.decode("utf-8", "replace")
    return call(app, api_event("POST", "/predict", body=body, content_type=content_type))


def score(app, data: bytes, content_type: str) -> float:
    reply = send(app, data, content_type)
    assert reply.status == 200, reply
    return reply.json()["probability"]


@pytest.fixture(scope="module")
def normals():
    return [picture(p) for p in original_images() if p.parent.name == "NORMAL"]


def assert_scores_like_png(app, data: bytes, content_type: str, pic: np.ndarray) -> None:
    expected = score(app, png8(pic), "image/png")
    got = score(app, data, content_type)
    assert got == pytest.approx(expected, abs=TOLERANCE)


def test_png16_holding_12bit_data_scores_like_the_8bit_png(app, normals):
    for pic in normals:
        assert_scores_like_png(app, png16(scaled(pic, 12)), "image/png", pic)
        assert_scores_like_png(app, png16(scaled(pic, 12), sbit=12), "image/png", pic)


def test_dicom_without_transfer_syntax_decodes_with_the_detected_encoding(app, normals):
    # 16-bit MONOCHROME1, 10 bits stored, Implicit VR Little Endian, no preamble, no DICM, no file meta.
    for pic in normals:
        data, shown = dicom_file(pic, "implicit_le_no_meta", "MONOCHROME1", 10, "none")
        assert b"DICM" not in data[:200] and b"1.2.840.10008.1.2" not in data
        assert_scores_like_png(app, data, "application/dicom", shown)


def test_dicom_voi_lut_sequence_is_applied(app, normals):
    for pic in normals:
        data, shown = dicom_file(pic, "explicit_le", "MONOCHROME2", 12, "voi_lut_sequence")
        assert_scores_like_png(app, data, "application/dicom", shown)


def test_every_accepted_image_type_is_a_binary_media_type_of_the_api():
    assert set(SUPPORTED_MEDIA_TYPES) <= set(BINARY_MEDIA_TYPES)
    assert {"image/jpg", "image/pjpeg", "application/dicom+octet-stream"} <= set(BINARY_MEDIA_TYPES)


@pytest.mark.parametrize("media_type", ["image/jpg", "image/pjpeg"])
def test_jpeg_aliases_arrive_intact(app, normals, media_type, originals):
    data = originals[0].read_bytes()
    assert score(app, data, media_type) == pytest.approx(score(app, data, "image/jpeg"), abs=1e-9)


def test_dicom_octet_stream_alias_arrives_intact(app, normals):
    data, shown = dicom_file(normals[0], "explicit_le", "MONOCHROME2", 12, "none")
    assert_scores_like_png(app, data, "application/dicom+octet-stream", shown)


def test_12bit_and_lossless_standalone_jpegs_decode(app, normals):
    import imagecodecs

    pic = normals[0]
    v12 = scaled(pic, 12)
    assert_scores_like_png(app, imagecodecs.jpeg8_encode(v12, level=100, bitspersample=12), "image/jpeg", pic)
    lossless = imagecodecs.jpeg8_encode(scaled(pic, 16), lossless=True, predictor=1, bitspersample=16)
    assert lossless[2:4] != b"\xff\xc3" and b"\xff\xc3" in lossless[:400]  # SOF3
    assert_scores_like_png(app, lossless, "image/jpeg", pic)


def test_unsupported_jpeg_kind_is_415_naming_it(app, originals):
    data = bytearray(originals[0].read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 1] = 0xC9  # the same frame header, marked arithmetic-coded
    reply = send(app, bytes(data), "image/jpeg")
    assert (reply.status, reply.error_code) == (415, "unsupported_media_type")
    message = reply.json()["error"]["message"]
    assert message.startswith("arithmetic-coded extended JPEG (8-bit) is not supported")
    assert "<" not in message and "0x" not in message


@pytest.mark.parametrize("encoding", ["jpeg_lossless_sv1", "jpeg_ls"])
def test_lossless_dicoms_decode(app, normals, encoding):
    for pic in normals[:2]:
        data, shown = dicom_file(pic, encoding, "MONOCHROME2", 16, "none")
        assert_scores_like_png(app, data, "application/dicom", shown)


def test_the_whole_field_corpus_scores_like_its_pictures(app):
    """Every encoding x photometric interpretation x bit depth x display transform, one original
    of each class, at 384 px a side (the model sees 224 px or less)."""
    paths = [next(p for p in original_images() if p.parent.name == c) for c in ("NORMAL", "PNEUMONIA")]
    failures, count, references = [], 0, {}
    for f in corpus(paths, side=384):
        key = f.picture.tobytes()
        if key not in references:
            references[key] = score(app, png8(f.picture), "image/png")
        reply = send(app, f.data, f.content_type)
        count += 1
        if reply.status != 200:
            failures.append(f"{f.name}: {reply.status} {reply.text[:120]}")
        elif abs(reply.json()["probability"] - references[key]) > TOLERANCE:
            failures.append(f"{f.name}: {reply.json()['probability']:.5f} vs {references[key]:.5f}")
    assert count >= 200
    assert not failures, "\n".join(failures)
