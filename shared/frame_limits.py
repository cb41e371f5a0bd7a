"""Encapsulated DICOM frames checked against Rows/Columns and the pixel limit before decoding.

A compressed frame carries its own header (JPEG/JPEG-LS SOF, ITU-T T.81 B.2.2 / T.87; JPEG 2000
SIZ, ITU-T T.800 A.5.1), and decoders allocate what that header says, not what the DICOM
Rows/Columns say: a 748-byte file declaring 64x64 in DICOM and 40000x40000 in its codestream
would otherwise cost gigabytes. :func:`check_encapsulated_frame` reads the header only.
"""

from __future__ import annotations

from typing import Any

from .imaging import CorruptImageError, check_dimensions, jpeg_frame

_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def frame_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a compressed frame's own header declares, or None for a stream with no
    such header (RLE, or an unknown stream that the pixel decoder will refuse)."""
    if frame.startswith(b"\xff\xd8"):
        sof = jpeg_frame(frame)
        return None if sof is None else (sof.width, sof.height)
    if frame.startswith(_J2K_SOC_SIZ) or frame.startswith(_JP2_MAGIC):
        from openjpeg import get_parameters  # header only: opj_read_header, no tile is decoded

        params = get_parameters(frame, j2k_format=2 if frame.startswith(_JP2_MAGIC) else 0)
        return int(params["columns"]), int(params["rows"])
    return None


def check_encapsulated_frame(ds: Any, rows: int, cols: int) -> None:
    """Raise before decoding when the single frame of an encapsulated ``PixelData`` declares a size
    over the limit (:class:`~shared.imaging.ImageDimensionsError`, 400 ``image_dimensions``) or
    other than ``rows`` x ``cols`` (:class:`~shared.imaging.CorruptImageError`)."""
    from pydicom.encaps import generate_frames

    elem = ds["PixelData"] if "PixelData" in ds else None
    if elem is None or not elem.is_undefined_length:
        return
    try:
        first = next(generate_frames(elem.value, number_of_frames=1), b"")  # skips the offset table
    except (ValueError, StopIteration):
        raise CorruptImageError("the DICOM pixel data is damaged: its fragments cannot be read") from None
    try:
        size = frame_size(first)
    except (RuntimeError, ValueError, OSError):
        return  # an unreadable header stops the decoder at the same point, with its own message
    if size is None:
        return
    check_dimensions(*size)
    if size != (cols, rows):
        raise CorruptImageError(f"the compressed frame declares {size[0]}x{size[1]} px but the DICOM header says "
                                f"{cols}x{rows}; the file is inconsistent")
