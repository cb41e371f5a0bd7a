"""Field-file corpus: the ways clinical systems write a radiograph, made from the six originals.

Each :class:`FieldFile` holds the bytes a user would send, its Content-Type, and the 8-bit picture
a DICOM viewer (or an image viewer, for PNG/JPEG) shows for it, derived here from the DICOM
standard's own formulas (PS3.3 C.11), not from the decoder under test. The product must give
the same probability for the file as for that picture sent as an 8-bit PNG.

The grid: DICOM encodings (Explicit VR Little Endian; Implicit VR Little Endian with no preamble
and no file meta; RLE; JPEG Lossless SV1; JPEG-LS; JPEG 2000) x photometric interpretations
(MONOCHROME2, MONOCHROME1) x bits stored (12, 16) x display transforms (none, rescale + linear
window, VOI LUT Sequence, Presentation LUT Shape INVERSE); and standalone rasters: 16-bit PNG at
10/12/14/16 bits with and without ``sBIT``, 12-bit JPEG (SOF1), lossless JPEG (SOF3), JPEG-LS.

Write the corpus to a folder (one file per case plus ``expected/`` PNGs)::

    python tests/field_corpus.py OUT_DIR [--side 512]
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DICOM_ENCODINGS = ("explicit_le", "implicit_le_no_meta", "rle", "jpeg_lossless_sv1", "jpeg_ls", "jpeg2000")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
BITS_STORED = (12, 16)
LUT_KINDS = ("none", "rescale_window", "voi_lut_sequence", "inverse_shape")
GAMMA = 2.2  # of the VOI LUT Sequence the corpus writes: a non-linear curve, as film-like LUTs are


@dataclass(frozen=True)
class FieldFile:
    name: str
    data: bytes
    content_type: str
    picture: np.ndarray  # uint8, what a viewer shows: the 8-bit PNG it must score like


def picture(path: Path, side: int | None = None) -> np.ndarray:
    """An original as 8-bit gray, optionally downscaled so its longer side is ``side``, spanning 0..255."""
    img = Image.open(path).convert("L")
    if side and max(img.size) > side:
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = arr.min(), arr.max()
    return np.rint((arr - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def png8(pic: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pic, "L").save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit gray PNG of ``values`` (uint16), with an ``sBIT`` chunk after IHDR when given."""
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, "PNG")
    data = buf.getvalue()
    if sbit is None:
        return data
    end_ihdr = 8 + 8 + 13 + 4
    return data[:end_ihdr] + _chunk(b"sBIT", bytes([sbit])) + data[end_ihdr:]


def scaled(pic: np.ndarray, bits: int) -> np.ndarray:
    """0..255 -> 0..2**bits-1, rounded: the picture at a higher bit depth."""
    return np.rint(pic.astype(np.float64) * (2 ** bits - 1) / 255.0).astype(np.uint16)


def raster_files(pic: np.ndarray, tag: str) -> Iterator[FieldFile]:
    import imagecodecs

    for bits in (10, 12, 14, 16):
        values = scaled(pic, bits)
        yield FieldFile(f"{tag}-png16-{bits}bit", png16(values), "image/png", pic)
        yield FieldFile(f"{tag}-png16-{bits}bit-sbit", png16(values, sbit=bits), "image/png", pic)
    # sBIT as the PNG specification means it: 12 significant bits scaled up to fill 16.
    yield FieldFile(f"{tag}-png16-12bit-sbit-shifted", png16(scaled(pic, 12) << 4, sbit=12), "image/png", pic)
    v12 = scaled(pic, 12)
    yield FieldFile(f"{tag}-jpeg12-sof1", imagecodecs.jpeg8_encode(v12, level=100, bitspersample=12),
                    "image/jpeg", pic)
    yield FieldFile(f"{tag}-jpeg-lossless-sof3-12bit",
                    imagecodecs.jpeg8_encode(v12, lossless=True, predictor=1, bitspersample=12), "image/jpeg", pic)
    yield FieldFile(f"{tag}-jpeg-lossless-sof3-16bit",
                    imagecodecs.jpeg8_encode(scaled(pic, 16), lossless=True, predictor=1, bitspersample=16),
                    "image/jpg", pic)
    yield FieldFile(f"{tag}-jpeg-ls-12bit", imagecodecs.jpegls_encode(v12), "image/pjpeg", pic)


def stored_values(shown: np.ndarray, bits: int, kind: str) -> tuple[np.ndarray, dict, np.ndarray]:
    """Stored pixel values whose display (PS3.3 C.11) is ``shown`` (uint8), the attributes that
    say so, and the picture actually shown (``shown`` with any out-of-window pixels clipped)."""
    top = 2 ** bits - 1
    q = shown.astype(np.int64)
    attrs: dict = {}
    expected = shown.copy()
    if kind in ("none", "inverse_shape"):
        stored = np.rint(q * top / 255.0)
    elif kind == "rescale_window":
        # Modality value m = 2 * stored - 1024; LINEAR window (C.11.2.1.2.1) over [offset, offset + 255 k].
        k = 8 if bits == 12 else 128
        offset = 100 if bits == 12 else 2000
        stored = (offset + q * k + 1024) // 2
        attrs.update(RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US",
                     WindowCenter=offset + 0.5 + 255 * k / 2, WindowWidth=255 * k + 1)
        # Two pixels outside the window (a marker, a dead pixel): shown black and white.
        stored[0, 0], stored[0, 1] = 0, top
        expected[0, 0], expected[0, 1] = 0, 255
    elif kind == "voi_lut_sequence":
        from pydicom.dataset import Dataset

        n = top + 1
        lut = np.rint(65535.0 * (np.arange(n) / (n - 1)) ** GAMMA).astype(np.uint16)
        stored = np.rint((n - 1) * (q / 255.0) ** (1 / GAMMA))
        item = Dataset()
        item.add_new(0x00283002, "US", [n if n < 65536 else 0, 0, 16])  # LUT Descriptor
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data
        item.LUTExplanation = "gamma 2.2"
        attrs["VOILUTSequence"] = [item]
        expected = np.clip(np.rint(lut[stored.astype(np.int64)] * 255.0 / 65535.0), 0, 255).astype(np.uint8)
    else:
        raise ValueError(kind)
    return stored.astype(np.uint16), attrs, expected


def dicom_file(pic: np.ndarray, encoding: str, photometric: str, bits: int, kind: str) -> tuple[bytes, np.ndarray]:
    """A DX dataset showing ``pic``; returns its bytes and the picture a viewer shows for it."""
    import imagecodecs
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
        generate_uid,
    )

    inverted = photometric == "MONOCHROME1" or kind == "inverse_shape"
    shown = 255 - pic if inverted else pic
    stored, attrs, expected = stored_values(shown, bits, kind)
    if inverted:
        expected = 255 - expected
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Field^Corpus"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if kind == "inverse_shape":  # on MONOCHROME1 the shape DX requires; on MONOCHROME2 an inverted display
        ds.PresentationLUTShape = "INVERSE"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    if encoding == "explicit_le":
        ds.save_as(buf, enforce_file_format=True)
    elif encoding == "implicit_le_no_meta":
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    elif encoding in ("rle", "jpeg2000"):
        ds.compress(RLELossless if encoding == "rle" else JPEG2000Lossless, stored)
        ds.save_as(buf, enforce_file_format=True)
    elif encoding in ("jpeg_lossless_sv1", "jpeg_ls"):
        frame = (imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits)
                 if encoding == "jpeg_lossless_sv1" else imagecodecs.jpegls_encode(stored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1 if encoding == "jpeg_lossless_sv1" else JPEGLSLossless
        ds.save_as(buf, enforce_file_format=True)
    else:
        raise ValueError(encoding)
    return buf.getvalue(), expected


def dicom_files(pic: np.ndarray, tag: str) -> Iterator[FieldFile]:
    for encoding in DICOM_ENCODINGS:
        for photometric in PHOTOMETRICS:
            for bits in BITS_STORED:
                for kind in LUT_KINDS:
                    data, expected = dicom_file(pic, encoding, photometric, bits, kind)
                    media = "application/dicom+octet-stream" if encoding == "implicit_le_no_meta" else "application/dicom"
                    yield FieldFile(f"{tag}-dcm-{encoding}-{photometric.lower()}-{bits}bit-{kind}", data, media,
                                    expected)


def corpus(paths: list[Path], side: int | None = 512) -> Iterator[FieldFile]:
    """Every case for each original in ``paths``."""
    for path in paths:
        pic = picture(path, side)
        yield from raster_files(pic, path.stem)
        yield from dicom_files(pic, path.stem)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/field_corpus.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write the files into")
    ap.add_argument("--side", type=int, default=512, help="longer side of each picture in pixels")
    ap.add_argument("--originals", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_original_sample",
                    help="folder holding train/<class>/*.jpeg")
    args = ap.parse_args(argv)
    (args.out / "expected").mkdir(parents=True, exist_ok=True)
    suffix = {"image/png": ".png", "application/dicom": ".dcm", "application/dicom+octet-stream": ".dcm"}
    n = 0
    for f in corpus(sorted(args.originals.glob("train/*/*.jpeg")), args.side):
        (args.out / f"{f.name}{suffix.get(f.content_type, '.jpg')}").write_bytes(f.data)
        (args.out / "expected" / f"{f.name}.png").write_bytes(png8(f.picture))
        n += 1
    print(f"wrote {n} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
