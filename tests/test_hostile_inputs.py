"""Crafted DICOMs whose compressed frame declares another size than the DICOM header: refused
before decoding, at a small peak memory (each case in a fresh subprocess, ``ru_maxrss``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("openjpeg")

_PROBE = textwrap.dedent("""
    import json, resource, sys
    from shared.imaging import ImageError, decode_image
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_image(data, "dicom")
        code = None
    except ImageError as exc:
        code = exc.code
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "grew_mb": (after - before) / 1024}))
""")


def _lying_j2k_dicom(side: int) -> bytes:
    """64x64 in Rows/Columns; the JPEG 2000 codestream's SIZ patched to ``side`` x ``side``."""
    import io

    import pydicom
    from openjpeg.utils import encode_array
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    stream = bytearray(encode_array(np.zeros((64, 64), np.uint8), codec_format=0))
    assert stream[2:4] == b"\xff\x51"
    # SIZ (T.800 A.5.1): marker, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (4 bytes each)
    stream[8:12] = side.to_bytes(4, "big")
    stream[12:16] = side.to_bytes(4, "big")
    stream[24:28] = side.to_bytes(4, "big")  # XTsiz, YTsiz: one tile as large as the image
    stream[28:32] = side.to_bytes(4, "big")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEG2000Lossless
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 64, 64, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _probe(tmp_path, data: bytes) -> dict:
    path = tmp_path / "crafted.dcm"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_jpeg2000_frame_larger_than_the_header_is_refused_before_decoding(tmp_path):
    data = _lying_j2k_dicom(40_000)
    assert len(data) < 2_000  # a tiny upload
    got = _probe(tmp_path, data)
    assert got["code"] == "image_dimensions"
    assert got["grew_mb"] < 50


def test_jpeg2000_frame_of_another_legal_size_is_refused_as_inconsistent(tmp_path):
    got = _probe(tmp_path, _lying_j2k_dicom(4_000))
    assert got["code"] == "corrupt_image"
    assert got["grew_mb"] < 50
