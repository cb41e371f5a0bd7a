"""Decoding and validation of the images a user may send or train on.

Everything that comes in as bytes goes through :func:`decode_image`, which returns an 8-bit
grayscale Pillow image or raises an :class:`ImageError` whose message a person can act on. The
checks run before pixels are decoded, so a decompression bomb costs a header read, not memory.

Supported: JPEG (EXIF orientation applied), PNG (1/8/16-bit; gray, gray+alpha, RGB, RGBA,
palette) and DICOM (uncompressed, or any compressed transfer syntax that pydicom can decode with
the installed handlers; MONOCHROME1 is inverted; rescale slope/intercept and the first VOI window
are applied). No DICOM tag other than the ones describing pixels is ever read out of the file,
except Modality, ViewPosition and BodyPartExamined, which ``shared.ood.check_dicom_header`` reads
to refuse what is not a frontal chest X-ray before its pixels are decoded.
"""

from __future__ import annotations

import io
import logging
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


def _decode_raster(data: bytes, fmt: str, min_side: int | None = None) -> DecodedImage:
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDimensionsError(f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"the {fmt.upper()} data is damaged or truncated ({_short(exc)})") from None
    if fmt == "jpeg":
        img = ImageOps.exif_transpose(img)
    gray = _to_gray8(img)
    return DecodedImage(gray, fmt, gray.width, gray.height)


def _to_gray8(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples span 0..65535 by definition of the format; scale that range to 0..255.
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
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


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


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
        except Exception as exc:  # malformed files raise many types, deep inside element parsing
            # Only the type: pydicom's messages may quote the bytes or values of the element.
            raise CorruptImageError(f"the DICOM file is damaged or malformed ({type(exc).__name__})") from None


def _decode_dicom_dataset(data: bytes) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptImageError(f"the DICOM file cannot be parsed ({type(exc).__name__})") from None
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
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedDicomError(
            f"DICOM transfer syntax {_syntax_name(tsyntax)} cannot be decoded here; send it uncompressed "
            f"(Explicit VR Little Endian) or as JPEG/PNG ({type(exc).__name__})"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, RuntimeError, OSError, EOFError) as exc:
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
            raise UnsupportedDicomError(
                f"DICOM transfer syntax {_syntax_name(tsyntax)} could not be decoded ({type(exc).__name__}); "
                "send it uncompressed (Explicit VR Little Endian) or as JPEG/PNG"
            ) from None
        raise CorruptImageError(f"the DICOM pixel data is damaged or inconsistent ({_short(exc)})") from None

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or arr.shape[-1] == 3:
            rgb = arr.astype(np.float64)
            arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        else:
            raise UnsupportedDicomError(f"DICOM pixel array of shape {arr.shape} is not a single radiograph")
    elif arr.ndim != 2:
        raise UnsupportedDicomError(f"DICOM pixel array of shape {arr.shape} is not a single radiograph")

    values = arr.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = values * slope + intercept
    out = _window(values, ds)
    if photometric == "MONOCHROME1":  # low values are bright: invert so that bone is white
        out = 255 - out
    gray = Image.fromarray(out, "L")
    return DecodedImage(gray, "dicom", gray.width, gray.height)


def _syntax_name(uid) -> str:
    """A registered transfer syntax by name; anything else unquoted, since the file wrote it."""
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(str(uid)) if uid is not None else None
    if entry and entry[1] == "Transfer Syntax":
        return f"'{entry[0]}'"
    return "(unrecognised)"


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window(values: np.ndarray, ds) -> np.ndarray:
    """First VOI window (DICOM PS3.3 C.11.2.1.2, linear) or, without one, the full value range."""
    center = _first(getattr(ds, "WindowCenter", None))
    width = _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width >= 1:
        y = (values - (center - 0.5)) / (width - 1) + 0.5
        return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
    return _minmax_to_uint8(values)


def decode_file(path, min_side: int | None = None) -> DecodedImage:
    """Decode an image file; the extension is the format hint (needed for preamble-less DICOM)."""
    from pathlib import Path

    p = Path(path)
    return decode_image(p.read_bytes(), FILE_EXTENSIONS.get(p.suffix.lower()), min_side)
