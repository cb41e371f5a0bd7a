"""Decoding and validation of the images a user may send or train on.

Everything that comes in as bytes goes through :func:`decode_image`, which returns an 8-bit
grayscale Pillow image or raises an :class:`ImageError` whose message a person can act on. The
checks run before pixels are decoded, so a decompression bomb costs a header read, not memory.

Supported:

- JPEG: baseline and progressive 8-bit (Pillow, EXIF orientation applied); 12-bit extended
  (SOF1), lossless (SOF3) and JPEG-LS through libjpeg (``pylibjpeg-libjpeg``), mapped to 8 bits
  by :func:`high_depth_to_uint8`. Hierarchical and arithmetic-coded JPEGs are refused with 415.
- PNG: 1/2/4/8/16-bit; gray, gray+alpha, RGB, RGBA, palette. A 16-bit gray PNG is read by its
  real bit depth (the ``sBIT`` chunk, else the data; see :func:`high_depth_to_uint8`).
- DICOM: uncompressed, RLE, JPEG (baseline, extended, lossless), JPEG-LS and JPEG 2000 through
  pydicom's pixel decoders (pylibjpeg plugins). The displayed image is what a viewer shows:
  Modality LUT (or rescale), then the VOI LUT Sequence or the window (with its VOI LUT Function),
  then the Presentation LUT and the photometric interpretation (PS3.3 C.11, PS3.4 N.2), each
  through ``pydicom.pixels``. A dataset whose file meta lacks or misstates an uncompressed
  transfer syntax is decoded with the encoding pydicom detected while reading it.
- TIFF is not accepted (415): radiographs leave a PACS as DICOM, and TIFF's variants (tiles,
  planar configuration, floating point) would each need their own rule.

No DICOM tag other than the ones describing pixels is ever read out of the file, except Modality,
ViewPosition and BodyPartExamined, which ``shared.ood.check_dicom_header`` reads to refuse what is
not a frontal chest X-ray before its pixels are decoded.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 50_000_000  # ~7,000 x 7,000: larger than any plain radiograph
MAX_SIDE = 16_384
MIN_SIDE = 32

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

MEDIA_TYPES = {
    "jpeg": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "png": ("image/png",),
    "dicom": ("application/dicom", "application/dicom+octet-stream"),
}
SUPPORTED_MEDIA_TYPES = tuple(t for types in MEDIA_TYPES.values() for t in types)
FILE_EXTENSIONS = {".jpeg": "jpeg", ".jpg": "jpeg", ".png": "png", ".dcm": "dicom", ".dicom": "dicom"}


class ImageError(ValueError):
    """An input that is not a usable X-ray. ``code`` is stable; the message is for people."""

    code = "invalid_image"
    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EmptyImageError(ImageError):
    code = "empty_image"


class UnsupportedFormatError(ImageError):
    code = "unsupported_media_type"
    http_status = 415


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageDimensionsError(ImageError):
    code = "image_dimensions"


class UnsupportedDicomError(ImageError):
    code = "unsupported_dicom"
    http_status = 415


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode "L"
    format: str  # "jpeg" | "png" | "dicom"
    width: int
    height: int


def media_type_format(media_type: str | None) -> str | None:
    """The format a Content-Type names (parameters ignored), or None when it names none we read."""
    if not media_type:
        return None
    base = media_type.split(";", 1)[0].strip().lower()
    for fmt, types in MEDIA_TYPES.items():
        if base in types:
            return fmt
    return None


def sniff_format(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def check_dimensions(width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageDimensionsError(
            f"image is {width}x{height} px; a chest X-ray must be at least {MIN_SIDE}x{MIN_SIDE} px"
        )
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageDimensionsError(
            f"image is {width}x{height} px, over the limit of {MAX_SIDE} px a side and "
            f"{MAX_PIXELS // 1_000_000} megapixels; downscale it before sending"
        )


def decode_image(data: bytes, declared_format: str | None = None, min_side: int | None = None) -> DecodedImage:
    """Bytes -> 8-bit grayscale image. ``declared_format`` ("jpeg"/"png"/"dicom") is a hint.

    The bytes decide the format when they carry a signature; a DICOM file without its 128-byte
    preamble is accepted only when declared as DICOM. With ``min_side``, a JPEG is decoded at the
    smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps both sides at least that long
    (``shared.preprocessing.decode_min_side`` says how long).
    """
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None and declared_format == "dicom":
        fmt = "dicom"
    if fmt is None:
        if data.startswith(TIFF_MAGICS):
            raise UnsupportedFormatError("TIFF is not accepted; send the radiograph as DICOM, PNG or JPEG")
        if data[:1] in (b"{", b"[") or _looks_like_text(data):
            raise UnsupportedFormatError("the body is text, not an image; send JPEG, PNG or DICOM bytes")
        raise UnsupportedFormatError("unrecognised image format; send JPEG, PNG or DICOM")
    if fmt == "dicom":
        return _decode_dicom(data)
    return _decode_raster(data, fmt, min_side)


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch >= 9 for ch in head)


# JPEG start-of-frame markers (ITU-T T.81 Table B.1; T.87 for JPEG-LS) -> the kind, for messages.
_SOF_KINDS = {
    0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "hierarchical", 0xC6: "hierarchical progressive", 0xC7: "hierarchical lossless",
    0xC9: "arithmetic-coded extended", 0xCA: "arithmetic-coded progressive", 0xCB: "arithmetic-coded lossless",
    0xCD: "arithmetic-coded hierarchical", 0xCE: "arithmetic-coded hierarchical progressive",
    0xCF: "arithmetic-coded hierarchical lossless", 0xF7: "JPEG-LS",
}
# Decoded by libjpeg (pylibjpeg-libjpeg) rather than Pillow, whose libjpeg reads 8-bit DCT only.
_LIBJPEG_SOFS = (0xC1, 0xC3, 0xF7)


@dataclass(frozen=True)
class JpegFrame:
    marker: int  # the SOF marker's second byte, e.g. 0xC0
    precision: int  # bits per sample
    height: int
    width: int
    components: int

    @property
    def kind(self) -> str:
        return _SOF_KINDS.get(self.marker, "unknown")


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The first frame header of a JPEG stream, or None when none is found before the scan data.

    Walks the marker segments of ITU-T T.81 Annex B (each ``FF xx`` followed by a big-endian
    length) from the SOI marker; no pixel data is read.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_KINDS and pos + 10 <= n:
            return JpegFrame(marker, data[pos + 4], int.from_bytes(data[pos + 5:pos + 7], "big"),
                             int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9])
        if length < 2:
            return None
        pos += 2 + length
    return None


def png_significant_bits(data: bytes) -> int | None:
    """The gray sample's significant bits from a PNG's ``sBIT`` chunk (PNG spec 11.3.3.4), or None.

    Only the chunks before the first IDAT are read; None for a colour PNG or one without sBIT.
    """
    pos, color_type = len(PNG_MAGIC), None
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR" and len(body) >= 10:
            color_type = body[9]
        elif ctype == b"sBIT" and color_type in (0, 4) and body:
            return int(body[0])
        elif ctype in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def high_depth_to_uint8(arr: np.ndarray, container_bits: int = 16, significant_bits: int | None = None) -> np.ndarray:
    """Gray samples held in ``container_bits`` (uint16 array) -> uint8, by their real bit depth.

    CR/DX exports often write 10-, 12- or 14-bit data into 16-bit samples without scaling them
    up, so "divide by 65535" would show them nearly black. The full-scale value is decided by:

    1. ``significant_bits`` (a PNG ``sBIT`` chunk, a JPEG frame's sample precision) when given
       and below ``container_bits``: full scale is ``2**significant_bits - 1`` if no sample exceeds
       it (data written unscaled, as exporters do), else ``2**container_bits - 1`` (data scaled up
       to the container, as the PNG specification asks of an encoder);
    2. otherwise the data: the smallest even depth of 8, 10, 12, 14 or 16 bits that holds the
       largest sample. A 12-bit picture whose brightest pixel is 3,000 thus maps 4,095 to white,
       like the same picture in a 12-bit container; a full-range 16-bit image is unaffected.

    Returns an array of the same shape, uint8, 0 at 0 and 255 at full scale (rounded).
    """
    top = int(arr.max()) if arr.size else 0
    full = 2 ** container_bits - 1
    if significant_bits is not None and 0 < significant_bits < container_bits:
        if top <= 2 ** significant_bits - 1:
            full = 2 ** significant_bits - 1
    elif significant_bits is None:
        bits = next((b for b in (8, 10, 12, 14) if top < 2 ** b), container_bits)
        full = 2 ** min(bits, container_bits) - 1
    scaled = np.rint(arr.astype(np.float64) * (255.0 / full))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _decode_raster(data: bytes, fmt: str, min_side: int | None = None) -> DecodedImage:
    if fmt == "jpeg":
        frame = jpeg_frame(data)
        if frame is not None and (frame.marker in _LIBJPEG_SOFS and (frame.precision > 8 or frame.marker != 0xC1)):
            return _decode_libjpeg(data, frame)
        if frame is not None and (frame.marker not in (0xC0, 0xC1, 0xC2) or frame.precision != 8):
            raise UnsupportedFormatError(
                f"{frame.kind} JPEG ({frame.precision}-bit) is not supported; send baseline, progressive, "
                "12-bit, lossless or JPEG-LS JPEG, PNG or DICOM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
            check_dimensions(*img.size)
            if min_side and fmt == "jpeg":
                img.draft(img.mode, (min_side, min_side))
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDimensionsError("image rejected as a decompression bomb: its header declares more pixels than any radiograph has") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"the {fmt.upper()} data is damaged or truncated{_reason(exc)}") from None
    if fmt == "jpeg":
        img = ImageOps.exif_transpose(img)
    if fmt == "png" and img.mode in _SIXTEEN_BIT_GRAY:
        arr = high_depth_to_uint8(np.asarray(img).astype(np.uint16), 16, png_significant_bits(data))
        gray = Image.fromarray(arr, "L")
    else:
        gray = _to_gray8(img)
    return DecodedImage(gray, fmt, gray.width, gray.height)


def _decode_libjpeg(data: bytes, frame: JpegFrame) -> DecodedImage:
    """12-bit, lossless and JPEG-LS streams, which Pillow cannot read, through libjpeg."""
    check_dimensions(frame.width, frame.height)
    if frame.components not in (1, 3):
        raise UnsupportedFormatError(f"{frame.kind} JPEG with {frame.components} components is not supported")
    try:
        from libjpeg import decode as libjpeg_decode
    except ImportError:  # pragma: no cover - pinned in the base dependencies
        raise UnsupportedFormatError(f"{frame.kind} {frame.precision}-bit JPEG cannot be decoded here; "
                                     "send it as PNG or DICOM") from None
    try:
        arr = libjpeg_decode(data)
    except (RuntimeError, ValueError, OSError) as exc:
        raise CorruptImageError(f"the {frame.kind} JPEG data is damaged or truncated{_reason(exc)}") from None
    if arr.ndim == 3:
        arr = np.rint(arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114)
    if arr.ndim != 2 or arr.shape != (frame.height, frame.width):
        raise CorruptImageError(f"the {frame.kind} JPEG data is damaged or truncated (wrong decoded size)")
    # The frame's precision is the bit depth the encoder was told; 16 is the container, so the data decide.
    significant = frame.precision if frame.precision < 16 else None
    out = high_depth_to_uint8(arr.astype(np.uint16), 16, significant) if frame.precision > 8 \
        else np.clip(arr, 0, 255).astype(np.uint8)
    gray = Image.fromarray(out, "L")
    return DecodedImage(gray, "jpeg", gray.width, gray.height)


_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_gray8(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "L":
        return img
    if mode in (*_SIXTEEN_BIT_GRAY, "I"):
        return Image.fromarray(high_depth_to_uint8(np.clip(np.asarray(img), 0, 65535).astype(np.uint16)), "L")
    if mode == "F":
        return Image.fromarray(_minmax_to_uint8(np.asarray(img, dtype=np.float64)), "L")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        # Transparent pixels become black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return img.convert("L")


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise CorruptImageError("the image contains non-finite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


# Text a decoder may put in its message that means nothing to a user: object reprs, addresses,
# file paths, Python names.
_INTERNAL_TEXT = re.compile(r"<[^>]*>|0x[0-9a-fA-F]{4,}|[\\/]\w+[\\/]|\.py\b|\b[a-z_]+\.[a-z_]+\.\w+|Error\b|'[^']*'")


def _reason(exc: BaseException) -> str:
    """A decoder's own sentence about what is wrong, as `` (…)``; empty when it carries internal text."""
    text = " ".join(str(exc).split())
    if not text or _INTERNAL_TEXT.search(text) or len(text) > 120:
        return ""
    return f" ({text})"


@contextmanager
def _quiet_pydicom():
    """pydicom reports odd elements through warnings and its logger, quoting their values (a
    patient's name among them); neither may reach a log while a user's file is read."""
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.CRITICAL + 1)  # children inherit it: pydicom.pixels.* too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.setLevel(level)


def _decode_dicom(data: bytes) -> DecodedImage:
    with _quiet_pydicom():
        try:
            return _decode_dicom_dataset(data)
        except ImageError:
            raise
        except Exception:  # malformed files raise many types, deep inside element parsing
            # No detail: pydicom's messages may quote the bytes or values of the element.
            raise CorruptImageError("the DICOM file is damaged or malformed: an element cannot be read") from None


def _decode_dicom_dataset(data: bytes) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CorruptImageError("the DICOM file cannot be parsed: it is truncated or not DICOM") from None
    from .ood import check_dicom_header

    check_dicom_header(ds)  # before any pixel work: a CT slice or a lateral view is refused here
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedDicomError("the DICOM file has no pixel data (is it a structured report or a worklist?)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise CorruptImageError("the DICOM file lacks Rows/Columns") from None
    check_dimensions(cols, rows)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedDicomError(f"multi-frame DICOM ({frames} frames) is not supported; send a single radiograph")
    tsyntax = _settle_transfer_syntax(ds)
    from .frame_limits import check_encapsulated_frame

    check_encapsulated_frame(ds, rows, cols)  # the codestream's own size, before a decoder allocates it
    try:
        arr = ds.pixel_array
    except NotImplementedError:
        raise UnsupportedDicomError(
            f"DICOM transfer syntax {_syntax_name(tsyntax)} cannot be decoded here; send it uncompressed "
            "(Explicit VR Little Endian) or as JPEG/PNG"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, RuntimeError, OSError, EOFError) as exc:
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
            raise UnsupportedDicomError(
                f"DICOM transfer syntax {_syntax_name(tsyntax)} could not be decoded (the compressed data are damaged); "
                "send it uncompressed (Explicit VR Little Endian) or as JPEG/PNG"
            ) from None
        raise CorruptImageError(f"the DICOM pixel data is damaged or inconsistent{_reason(exc)}") from None

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2") and arr.ndim == 2:
        out = displayed_uint8(arr, ds)
    elif arr.ndim == 3 and arr.shape[-1] == 3 or photometric == "PALETTE COLOR":
        out = _colour_to_uint8(arr, ds, photometric)
    else:
        raise UnsupportedDicomError(
            f"DICOM pixel array of shape {arr.shape} ({photometric}) is not a single radiograph")
    gray = Image.fromarray(out, "L")
    return DecodedImage(gray, "dicom", gray.width, gray.height)


def _settle_transfer_syntax(ds):
    """The transfer syntax to decode with: the file meta's, or the one pydicom detected.

    Old CR files come without preamble and file meta, and some writers state an uncompressed
    syntax other than the one they used. pydicom reads such a dataset anyway and records the
    encoding it found (``Dataset.original_encoding``: implicit VR?, little endian?); for native
    (not encapsulated) pixel data that encoding is the transfer syntax. Encapsulated pixel data
    under a missing or uncompressed syntax cannot be told apart and raise UnsupportedDicomError.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    stated = meta.get("TransferSyntaxUID")
    stated = UID(str(stated)) if stated else None
    elem = ds["PixelData"] if "PixelData" in ds else None
    encapsulated = bool(elem is not None and elem.is_undefined_length)
    known = stated is not None and stated.is_transfer_syntax
    if known and stated.is_compressed == encapsulated:
        if encapsulated or (stated.is_implicit_VR, stated.is_little_endian) == tuple(ds.original_encoding):
            return stated
    if encapsulated:
        raise UnsupportedDicomError(
            "the DICOM pixel data is compressed but the file does not say how (its Transfer Syntax UID is "
            "missing or names an uncompressed encoding); send it uncompressed or as JPEG/PNG")
    detected = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                (False, False): ExplicitVRBigEndian}.get(tuple(ds.original_encoding))
    if detected is None:
        raise CorruptImageError("the DICOM file's encoding cannot be determined")
    meta.TransferSyntaxUID = detected
    return detected


def displayed_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """A grayscale DICOM image's stored values -> the 8-bit image a viewer displays.

    The grayscale pipeline of DICOM PS3.4 N.2.1 / PS3.3 C.11, each step through ``pydicom.pixels``:

    1. Modality LUT Sequence or Rescale Slope/Intercept (``apply_modality_lut``);
    2. the first VOI LUT Sequence item, else the first window with its VOI LUT Function
       (LINEAR, LINEAR_EXACT, SIGMOID) (``apply_voi_lut``, which prefers the LUT as viewers do);
    3. the Presentation LUT Sequence (``apply_presentation_lut``) when there is one.

    One rule then maps the range the last step can produce to 0..255: a LUT's output range
    (``2**bits - 1`` from its LUT Descriptor, widened if its data exceed it), the window's output
    range (what ``apply_windowing`` maps the extremes to), or, with no VOI transform, the image's
    own minimum..maximum. MONOCHROME1, or Presentation LUT Shape INVERSE, inverts that range
    (0 becomes 255). An invalid VOI transform (e.g. a LINEAR window narrower than 1) is skipped,
    as viewers skip it.

    ``arr``: Rows x Columns stored values (any integer or float dtype). Returns uint8, same shape.
    Raises CorruptImageError when the values are not finite.
    """
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    if not np.all(np.isfinite(values)):
        raise CorruptImageError("the image contains non-finite pixel values")
    lo = hi = None
    voi_lut = _first_item(ds, "VOILUTSequence")
    if voi_lut is not None and "LUTDescriptor" in voi_lut and "LUTData" in voi_lut:
        try:
            shown = apply_voi_lut(np.rint(values).astype(np.int64), ds)
            lo, hi = 0.0, float(_lut_full_scale(voi_lut, shown))
        except (ValueError, TypeError, IndexError, NotImplementedError, AttributeError):
            lo = hi = None
    if lo is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            shown = apply_windowing(values, ds)
            lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
        except (ValueError, TypeError, IndexError, ZeroDivisionError):
            lo = hi = None
    if lo is None:
        shown = values
        lo, hi = float(np.min(values)), float(np.max(values))
    presentation = _first_item(ds, "PresentationLUTSequence")
    if presentation is not None:
        try:
            shown = apply_presentation_lut(shown, ds)
            lo, hi = 0.0, float(_lut_full_scale(presentation, shown))
        except (ValueError, TypeError, IndexError, AttributeError):
            pass
    out = _range_to_uint8(np.asarray(shown, dtype=np.float64), lo, hi)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    shape = str(getattr(ds, "PresentationLUTShape", "") or "").strip().upper()
    if presentation is None and (photometric == "MONOCHROME1" or shape == "INVERSE"):
        out = 255 - out  # low values are bright: invert so that bone is white
    return out


def _first_item(ds, keyword: str):
    seq = ds.get(keyword)
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _lut_full_scale(item, output: np.ndarray) -> int:
    """A LUT's largest output: ``2**bits - 1`` from its LUT Descriptor's third value (PS3.3
    C.11.2.1.1), widened to the smallest bit depth holding the largest value actually produced
    when the descriptor understates it (a known writer error)."""
    bits = int(item.LUTDescriptor[2])
    top = int(np.max(output)) if output.size else 0
    while top > 2 ** bits - 1 and bits < 32:
        bits += 1
    return 2 ** bits - 1


def _range_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _colour_to_uint8(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """A colour DICOM (RGB, YBR already converted to RGB by pydicom, or PALETTE COLOR) -> luma."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedDicomError(f"DICOM pixel array of shape {arr.shape} is not a single radiograph")
    rgb = arr.astype(np.float64)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R BT.601
    full = 255.0 if arr.dtype.itemsize == 1 else 2.0 ** int(getattr(ds, "BitsStored", 16) or 16) - 1
    if photometric == "PALETTE COLOR" and arr.dtype.itemsize > 1:
        full = 65535.0  # palette entries are 16-bit (PS3.3 C.7.6.3.1.5)
    return _range_to_uint8(luma, 0.0, full)


def _syntax_name(uid) -> str:
    """A registered transfer syntax by name; anything else unquoted, since the file wrote it."""
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(str(uid)) if uid is not None else None
    if entry and entry[1] == "Transfer Syntax":
        return f"'{entry[0]}'"
    return "(unrecognised)"


def decode_file(path, min_side: int | None = None) -> DecodedImage:
    """Decode an image file; the extension is the format hint (needed for preamble-less DICOM)."""
    from pathlib import Path

    p = Path(path)
    return decode_image(p.read_bytes(), FILE_EXTENSIONS.get(p.suffix.lower()), min_side)
