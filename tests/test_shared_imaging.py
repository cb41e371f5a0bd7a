"""Decoding and validation of every input kind both sides accept (shared/imaging.py)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from shared.imaging import (
    CorruptImageError,
    EmptyImageError,
    ImageDimensionsError,
    ImageError,
    UnsupportedDicomError,
    UnsupportedFormatError,
    decode_file,
    decode_image,
    media_type_format,
)


def gradient(w=96, h=64) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, :] * np.linspace(0.2, 1, h)[:, None]
    return np.rint(x).astype(np.uint8)


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def make_dicom(pixels: np.ndarray, photometric="MONOCHROME2", bits=16, transfer=ExplicitVRLittleEndian,
               with_pixels=True, **extra) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def as_array(decoded) -> np.ndarray:
    assert decoded.image.mode == "L"
    return np.asarray(decoded.image)


def test_jpeg_real_original_decodes_to_gray(originals):
    d = decode_file(originals[0])
    assert d.format == "jpeg" and d.image.mode == "L" and min(d.width, d.height) > 700


def test_jpeg_exif_orientation_is_applied():
    base = Image.fromarray(gradient(96, 64), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    d = decode_image(jpeg_bytes(base, exif=exif))
    assert (d.width, d.height) == (64, 96)


def test_png_8_and_16_bit_gray_agree():
    g = gradient()
    eight = as_array(decode_image(png_bytes(Image.fromarray(g, "L"))))
    sixteen_img = Image.fromarray(g.astype(np.uint16) * 257)
    d16 = decode_image(png_bytes(sixteen_img))
    assert d16.format == "png"
    assert np.array_equal(as_array(d16), eight)


def test_png_rgb_rgba_palette_become_gray():
    g = gradient()
    rgb = Image.fromarray(np.stack([g, g, g], -1), "RGB")
    assert np.array_equal(as_array(decode_image(png_bytes(rgb))), g)
    rgba = np.stack([g, g, g, np.full_like(g, 255)], -1)
    rgba[:8, :8, 3] = 0  # a transparent corner becomes black, the radiograph's background
    out = as_array(decode_image(png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert out[:8, :8].max() == 0 and np.array_equal(out[8:, 8:], g[8:, 8:])
    pal = Image.fromarray(g, "L").convert("P")
    assert np.abs(as_array(decode_image(png_bytes(pal))).astype(int) - g).max() <= 8


def test_empty_text_and_unknown_formats_are_rejected():
    with pytest.raises(EmptyImageError):
        decode_image(b"")
    with pytest.raises(UnsupportedFormatError, match="text"):
        decode_image(b'{"hello": "world"}')
    gif = io.BytesIO()
    Image.fromarray(gradient(), "L").save(gif, "GIF")
    with pytest.raises(UnsupportedFormatError) as err:
        decode_image(gif.getvalue())
    assert err.value.http_status == 415


def test_truncated_jpeg_is_corrupt(originals):
    data = originals[0].read_bytes()
    with pytest.raises(CorruptImageError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def test_png_decompression_bomb_costs_a_header_read():
    # 60,000 x 60,000 gray PNG whose IDAT is a few KB: rejected before any pixel is inflated.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100000, 9)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(bomb) < 10_000
    with pytest.raises(ImageDimensionsError, match="over the limit|decompression bomb"):
        decode_image(bomb)


def test_absurd_dimensions_rejected_both_ways():
    with pytest.raises(ImageDimensionsError, match="at least"):
        decode_image(png_bytes(Image.new("L", (8, 8))))
    with pytest.raises(ImageDimensionsError):
        decode_image(png_bytes(Image.new("L", (20000, 40), 0)))


@pytest.mark.parametrize("bits", [8, 16])
def test_dicom_monochrome1_is_inverted_to_match_monochrome2(bits):
    g = gradient().astype(np.uint16)
    scale = 257 if bits == 16 else 1
    mono2 = as_array(decode_image(make_dicom(g * scale, "MONOCHROME2", bits)))
    mono1 = as_array(decode_image(make_dicom((255 - g) * scale, "MONOCHROME1", bits)))
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1
    assert np.abs(mono2.astype(int) - g.astype(int)).max() <= 1


def test_dicom_rescale_and_window_are_applied():
    raw = np.full((64, 64), 1000, np.uint16)
    raw[:, 32:] = 3000
    # window centred at 2*1000+(-1000)=1000 (left) .. width 2000: left half mid-grey, right half white
    d = decode_image(make_dicom(raw, RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="1500", WindowWidth="2001"))
    a = as_array(d)
    assert abs(int(a[0, 0]) - 64) <= 2 and a[0, 63] == 255


def test_dicom_without_preamble_needs_declared_type():
    data = make_dicom(gradient().astype(np.uint16) * 257)
    bare = data[132:]  # no preamble, no DICM magic
    with pytest.raises(UnsupportedFormatError):
        decode_image(bare)
    assert decode_image(bare, "dicom").format == "dicom"


def test_dicom_without_pixel_data_is_a_clear_error():
    with pytest.raises(UnsupportedDicomError, match="no pixel data"):
        decode_image(make_dicom(gradient(), with_pixels=False))


def test_dicom_with_undecodable_compressed_syntax_is_rejected_by_name():
    data = make_dicom(gradient(), transfer=JPEG2000Lossless, with_pixels=False)
    ds = pydicom.dcmread(io.BytesIO(data))
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a J2K header and garbage
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(UnsupportedDicomError, match="JPEG 2000") as err:
        decode_image(buf.getvalue())
    assert "Doe" not in err.value.message and "SECRET" not in err.value.message


def test_every_rejection_is_typed_with_a_message():
    for bad in (b"", b"hello", b"\xff\xd8\xff\xe0garbage", b"\x89PNG\r\n\x1a\n\x00\x00"):
        with pytest.raises(ImageError) as err:
            decode_image(bad)
        assert err.value.message and err.value.code and 400 <= err.value.http_status < 500


def test_media_type_mapping():
    assert media_type_format("image/jpeg; charset=binary") == "jpeg"
    assert media_type_format("IMAGE/PNG") == "png"
    assert media_type_format("application/dicom") == "dicom"
    assert media_type_format("text/plain") is None and media_type_format(None) is None


def test_jpeg_decodes_at_a_reduced_scale_that_keeps_min_side(originals):
    from shared.preprocessing import PreprocessSpec, decode_min_side

    path = max(originals, key=lambda p: p.stat().st_size)
    full = decode_file(path)
    side = decode_min_side(PreprocessSpec(size=160))
    small = decode_file(path, side)
    assert min(small.width, small.height) >= side
    assert small.width * small.height < full.width * full.height  # a full-size X-ray is drafted down
    tiny = decode_image(png_bytes(Image.fromarray(gradient(), "L")), None, side)
    assert (tiny.width, tiny.height) == (96, 64)  # never upscaled, PNG untouched
