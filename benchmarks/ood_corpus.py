"""The out-of-distribution corpus: inputs that are not a usable frontal chest X-ray.

    .venv/bin/python benchmarks/ood_corpus.py --out runs/ood-corpus     # writes the images and manifest.csv

Every image is made here, offline and deterministically (fixed seeds), from what the installed
packages ship and from the team's X-rays made unusable; nothing is downloaded. ``KINDS`` lists the
kinds; :func:`generate` yields one kind's images as encoded files (bytes, the format a client
would send). The committed ``benchmarks/ood_corpus_manifest.csv`` lists kind, file name, format,
size and SHA-256 of each image, so a rerun can be checked against it.

Kinds
    flat            constant images, black to white (PNG)
    gradient        linear and radial ramps (PNG)
    noise           uniform, Gaussian and salt-and-pepper noise (PNG)
    document        rendered pages of text (JPEG)
    ui_screenshot   rendered web-page/app layouts in colour (PNG)
    chart           matplotlib line, bar, scatter and image plots (PNG)
    photo           crops of the colour photographs matplotlib ships (JPEG)
    pattern         checkerboards, stripes, rings (PNG)
    other_modality  CT and MR slices pydicom and matplotlib ship, as PNG (no DICOM header to help)
    xray_inverted   dev-half X-rays with inverted polarity (JPEG)
    xray_rot90      dev-half X-rays turned by 90 or 270 degrees (JPEG)
    xray_rot180     dev-half X-rays turned upside down (JPEG)
    xray_corner     a corner of a dev-half X-ray, a quarter of each side (JPEG)
    dicom_header    DICOM files whose header says CT/MR/US/OT, lateral view, or a body part other than
                    the chest, with a real X-ray's pixels inside (the header rules must refuse them)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEV_HALF = DATA / "chest_xray_224" / "test"
MANIFEST = ROOT / "benchmarks" / "ood_corpus_manifest.csv"
PER_KIND = 15
KINDS = ("flat", "gradient", "noise", "document", "ui_screenshot", "chart", "photo", "pattern", "other_modality",
         "xray_inverted", "xray_rot90", "xray_rot180", "xray_corner", "dicom_header")
HEADER_KINDS = ("dicom_header",)  # refused by the DICOM header rules, before any pixel work
XRAY_KINDS = ("xray_inverted", "xray_rot90", "xray_rot180", "xray_corner")

_WORDS = ("patient report summary invoice total date signature the of and to in is for with on this that page "
          "account number amount due please review attached meeting agenda minutes project status").split()


def _png(arr_or_img) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(arr_or_img, quality: int = 90) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(256, 1025)), int(rng.integers(256, 1025))


def _flat(rng, i):
    w, h = _size(rng)
    level = int(round(i * 255 / (PER_KIND - 1)))
    return _png(np.full((h, w), level, np.uint8))


def _gradient(rng, i):
    w, h = _size(rng)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    mode = i % 3
    if mode == 0:
        g = x / (w - 1)
    elif mode == 1:
        g = y / (h - 1)
    else:
        g = np.hypot(x - w / 2, y - h / 2) / np.hypot(w / 2, h / 2)
    if i % 2:
        g = 1 - g
    lo, hi = sorted(rng.integers(0, 256, 2))
    return _png((lo + g * (hi - lo + 1) * 0.999).astype(np.uint8))


def _noise(rng, i):
    w, h = _size(rng)
    mode = i % 3
    if mode == 0:
        a = rng.integers(0, 256, (h, w))
    elif mode == 1:
        a = np.clip(rng.normal(128, 40, (h, w)), 0, 255)
    else:
        a = np.where(rng.random((h, w)) < 0.5, 0, 255)
    if i % 5 == 4:  # colour noise
        a = rng.integers(0, 256, (h, w, 3))
    return _png(a.astype(np.uint8))


def _font(size: int):
    return ImageFont.load_default(size=size)


def _document(rng, i):
    w, h = 850, 1100
    img = Image.new("L" if i % 2 else "RGB", (w, h), 255 if i % 4 else 235)
    d = ImageDraw.Draw(img)
    size = int(rng.integers(14, 26))
    font = _font(size)
    ypos = 60
    d.text((60, ypos), " ".join(rng.choice(_WORDS, 4)).title(), fill=0, font=_font(size + 12))
    ypos += size + 40
    while ypos < h - 80:
        line = " ".join(rng.choice(_WORDS, int(rng.integers(6, 12))))
        d.text((60, ypos), line, fill=int(rng.integers(0, 60)), font=font)
        ypos += int(size * 1.5)
        if rng.random() < 0.08:
            ypos += size
    return _jpeg(img, 85)


def _ui_screenshot(rng, i):
    w, h = int(rng.choice([1280, 1366, 1440, 800])), int(rng.choice([720, 768, 900, 1024]))
    bg = tuple(int(v) for v in rng.integers(200, 256, 3)) if i % 3 else (30, 30, 36)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    accent = tuple(int(v) for v in rng.integers(0, 200, 3))
    d.rectangle((0, 0, w, 64), fill=accent)
    d.text((20, 20), "Dashboard  Home  Settings  Help", fill=(255, 255, 255), font=_font(20))
    if i % 2:
        d.rectangle((0, 64, 220, h), fill=tuple(max(0, c - 30) for c in bg))
        for k in range(8):
            d.text((20, 90 + 40 * k), str(rng.choice(_WORDS)).title(), fill=(90, 90, 90), font=_font(18))
    x0 = 240 if i % 2 else 30
    ypos = 90
    while ypos < h - 60:
        kind = rng.integers(0, 3)
        if kind == 0:
            d.rectangle((x0, ypos, x0 + int(rng.integers(120, 260)), ypos + 40), fill=accent, outline=(0, 0, 0))
            d.text((x0 + 12, ypos + 10), str(rng.choice(_WORDS)).upper(), fill=(255, 255, 255), font=_font(18))
            ypos += 60
        elif kind == 1:
            d.rectangle((x0, ypos, w - 40, ypos + int(rng.integers(80, 200))), outline=(180, 180, 180), width=2)
            ypos += 220
        else:
            d.text((x0, ypos), " ".join(rng.choice(_WORDS, 10)), fill=(40, 40, 40), font=_font(16))
            ypos += 30
    return _png(img)


def _chart(rng, i):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    x = np.linspace(0, 10, 200)
    mode = i % 4
    if mode == 0:
        for k in range(int(rng.integers(1, 4))):
            ax.plot(x, np.sin(x * rng.uniform(0.5, 2)) + k)
    elif mode == 1:
        ax.bar(range(8), rng.uniform(1, 10, 8), color=plt.cm.tab10(np.arange(8)))
    elif mode == 2:
        ax.scatter(rng.normal(size=200), rng.normal(size=200), c=rng.random(200), s=12)
    else:
        ax.imshow(rng.random((20, 20)), cmap="viridis")
    ax.set_title(" ".join(rng.choice(_WORDS, 3)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _sample_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _photo(rng, i):
    sources = [_sample_data("grace_hopper.jpg"), _sample_data("Minduka_Present_Blue_Pack.png")]
    img = Image.open(sources[i % 2]).convert("RGB")
    w, h = img.size
    frac = rng.uniform(0.5, 1.0)
    cw, ch = int(w * frac), int(h * frac)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if i % 3 == 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.8, 2.0)
    img = img.resize((max(64, int(cw * scale)), max(64, int(ch * scale))), Image.Resampling.BICUBIC)
    return _jpeg(img, 88)


def _to_uint8(a: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    return np.clip((a - lo) * 255.0 / max(hi - lo, 1e-9), 0, 255).astype(np.uint8)


def _modality_slices() -> list[np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    slices = []
    for name in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm"):
        path = get_testdata_file(name, download=False)
        if path:
            slices.append(np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.float64))
    with gzip.open(_sample_data("s1045.ima.gz")) as f:  # an MR brain slice, 256 x 256 16-bit
        slices.append(np.frombuffer(f.read(), np.uint16).astype(np.float64).reshape(256, 256))
    return slices


def _other_modality(rng, i, _cache: dict = {}):  # noqa: B006 - a per-process cache on purpose
    if "slices" not in _cache:
        _cache["slices"] = _modality_slices()
    slices = _cache["slices"]
    a = _to_uint8(slices[i % len(slices)], rng.uniform(0, 5), rng.uniform(95, 100))
    img = Image.fromarray(a)
    side = int(rng.integers(256, 640))
    return _png(img.resize((side, side), Image.Resampling.BICUBIC))


def _pattern(rng, i):
    w, h = _size(rng)
    y, x = np.mgrid[0:h, 0:w]
    period = int(rng.integers(8, 80))
    mode = i % 3
    if mode == 0:
        a = ((x // period + y // period) % 2) * 255
    elif mode == 1:
        a = ((x // period) % 2) * 255 if i % 2 else ((y // period) % 2) * 255
    else:
        a = ((np.hypot(x - w / 2, y - h / 2) // period) % 2) * 255
    return _png(a.astype(np.uint8))


def dev_xrays(n: int = PER_KIND, offset: int = 0) -> list[Path]:
    """``n`` dev-half X-rays, alternating classes, in a fixed order (sorted names)."""
    normal = sorted((DEV_HALF / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((DEV_HALF / "PNEUMONIA").glob("*.jpeg"))
    picked = [p for pair in zip(normal, pneumonia, strict=False) for p in pair]
    return picked[offset:offset + n]


def _xray(i: int, offset: int) -> Image.Image:
    return Image.open(dev_xrays(PER_KIND, offset)[i]).convert("L")


def _xray_inverted(rng, i):
    return _jpeg(Image.fromarray(255 - np.asarray(_xray(i, 0))), 92)


def _xray_rot90(rng, i):
    return _jpeg(_xray(i, 20).rotate(90 if i % 2 else 270, expand=True), 92)


def _xray_rot180(rng, i):
    return _jpeg(_xray(i, 40).rotate(180), 92)


def _xray_corner(rng, i):
    img = _xray(i, 60)
    w, h = img.size
    cw, ch = w // 4, h // 4
    corner = i % 4
    left = 0 if corner in (0, 2) else w - cw
    top = 0 if corner in (0, 1) else h - ch
    return _jpeg(img.crop((left, top, left + cw, top + ch)), 92)


# (Modality, ViewPosition, BodyPartExamined) that the header rules refuse; None leaves the tag out.
HEADER_CASES = (
    ("CT", None, None), ("MR", None, None), ("US", None, None), ("OT", None, None), ("NM", None, None),
    ("CR", "LL", "CHEST"), ("DX", "RL", "CHEST"), ("DX", "LATERAL", None), ("CR", "RLD", None),
    ("CR", None, "SKULL"), ("DX", "AP", "HAND"), ("DX", "PA", "KNEE"), ("CR", None, "ABDOMEN"),
    ("PT", None, "CHEST"), ("CR", "PA", "PELVIS"),
)


def dicom_bytes(pixels: np.ndarray, modality: str | None, view: str | None, body_part: str | None) -> bytes:
    """An uncompressed single-frame DICOM (MONOCHROME2, 8-bit) with the given header tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(pixels.sum()), str(modality), str(view)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_header(rng, i):
    modality, view, part = HEADER_CASES[i]
    return dicom_bytes(np.asarray(_xray(i, 80)), modality, view, part)


_MAKERS = {
    "flat": (_flat, "png"), "gradient": (_gradient, "png"), "noise": (_noise, "png"),
    "document": (_document, "jpeg"), "ui_screenshot": (_ui_screenshot, "png"), "chart": (_chart, "png"),
    "photo": (_photo, "jpeg"), "pattern": (_pattern, "png"), "other_modality": (_other_modality, "png"),
    "xray_inverted": (_xray_inverted, "jpeg"), "xray_rot90": (_xray_rot90, "jpeg"),
    "xray_rot180": (_xray_rot180, "jpeg"), "xray_corner": (_xray_corner, "jpeg"), "dicom_header": (_dicom_header, "dcm"),
}
assert tuple(_MAKERS) == KINDS


def generate(kind: str, n: int = PER_KIND) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(file name, encoded bytes, format)`` for the first ``n`` images of ``kind``.

    Image ``i`` of a kind is the same whatever ``n`` is (each has its own seed), so tests can take
    a prefix of the corpus the benchmark scores.
    """
    maker, fmt = _MAKERS[kind]
    for i in range(min(n, PER_KIND)):
        rng = np.random.default_rng([KINDS.index(kind), i])
        yield f"{kind}-{i:02d}.{fmt}", maker(rng, i), {"dcm": "dicom"}.get(fmt, fmt)


def write_corpus(out: Path, kinds=KINDS) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in kinds:
        for name, data, fmt in generate(kind):
            (out / name).write_bytes(data)
            rows.append({"kind": kind, "file": name, "format": fmt, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ood-corpus", help="folder for the images")
    ap.add_argument("--manifest", type=Path, default=MANIFEST, help="where to copy manifest.csv (the committed one)")
    args = ap.parse_args(argv)
    rows = write_corpus(args.out)
    args.manifest.write_text((args.out / "manifest.csv").read_text())
    print(f"wrote {len(rows)} images of {len(KINDS)} kinds to {args.out}; manifest {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
