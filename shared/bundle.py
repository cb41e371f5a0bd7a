"""The model bundle: what training writes and serving reads (contract 3).

A bundle is a folder, shipped as ``model.tar.gz`` with its files at the archive root::

    model.onnx     inputs: "image" (N x C x H x W float32);
                   outputs: "logits" (N x classes), "features" (N x K x h x w, the last feature map)
    bundle.json    this module's schema, ``format_version`` 2 (1 is still read)
    ood.npz        the out-of-distribution check's arrays (``shared/ood.py``), named in bundle.json's
                   ``ood`` section; format 2 only, and optional there
    report/        metrics.json, roc.png, confusion_matrix.png, learning_curves.png, MODEL_CARD.md

``bundle.json`` carries everything serving needs besides the network: class names in index
order, the preprocessing spec, the decision threshold and the softmax temperature chosen on
validation, the classifier weights that turn the feature map into a class activation map, and
(format 2) the cut-offs of the out-of-distribution check fitted on the training images.

Format history: 1 had no ``ood`` section; 2 adds it. A format-1 bundle loads and serves, with the
pixel check reported as unavailable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .labels import POSITIVE_CLASS
from .preprocessing import PreprocessSpec

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.onnx"
REPORT_DIR = "report"
ARCHIVE_NAME = "model.tar.gz"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features")

OOD_FILE = "ood.npz"
_OOD_KEYS = ("file", "sha256", "cutoff", "view_cutoff")

# What ``unpack`` accepts, the one home of the archive limits: only the bundle's own members, as
# regular files (or the folders holding them), each within its own cap and all of them together
# within MAX_UNPACKED_BYTES (half of Lambda's default 512 MB /tmp would be 256 MB; the serving
# function's /tmp is sized for it). Links, devices, FIFOs and sparse files are refused on every
# Python, whatever its tarfile filters do (CVE-2025-4517 bypasses the ``data`` filter before
# 3.11.13 / 3.12.11).
MAX_ARCHIVE_MEMBERS = 64
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MEMBER_MAX_BYTES = {BUNDLE_JSON: 16 * 1024 * 1024, MODEL_FILE: MAX_UNPACKED_BYTES, OOD_FILE: 128 * 1024 * 1024}
REPORT_FILE_MAX_BYTES = 16 * 1024 * 1024  # each file under report/ (metrics.json, plots, MODEL_CARD.md)
_REPORT_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


class BundleError(ValueError):
    """A bundle that is missing, malformed or of an unknown format; the message says which part."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    meta: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.meta.get("positive_class", POSITIVE_CLASS))

    @property
    def preprocessing(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocessing"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def version(self) -> str:
        return str(self.meta["model_version"])

    @property
    def trained_at(self) -> str | None:
        return self.meta.get("provenance", {}).get("finished_at")

    @property
    def validation_metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics", {}).get("validation", {}))

    def ood_check(self):
        """The out-of-distribution check (:class:`shared.ood.OodCheck`), or None for a bundle without one."""
        from .ood import OodCheck

        section = self.meta.get("ood")
        if not section:
            return None
        return OodCheck(section, OodCheck.load_arrays((self.root / section["file"]).read_bytes()))

    def cam_weights(self) -> tuple[np.ndarray, np.ndarray]:
        cam = self.meta["cam"]
        return np.asarray(cam["weights"], dtype=np.float32), np.asarray(cam["bias"], dtype=np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def positive_probability(self, logits: np.ndarray) -> np.ndarray:
        return self.probabilities(logits)[..., self.positive_index]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def validate_meta(meta: Any) -> None:
    """Raise :class:`BundleError` listing every problem in a ``bundle.json`` document."""
    problems: list[str] = []
    if not isinstance(meta, dict):
        raise BundleError("bundle.json must hold a JSON object")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(f"bundle format_version {version!r} is not supported (this code reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    names = meta.get("class_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)):
        problems.append("class_names must be a list of at least two distinct names")
    elif meta.get("positive_class", POSITIVE_CLASS) not in names:
        problems.append(f"positive class {meta.get('positive_class', POSITIVE_CLASS)!r} is not among class_names")
    try:
        PreprocessSpec.from_dict(meta.get("preprocessing") or {})
        if not isinstance(meta.get("preprocessing"), dict):
            problems.append("preprocessing is missing")
    except (TypeError, ValueError) as exc:
        problems.append(f"preprocessing: {exc}")
    thr = meta.get("threshold")
    if not (isinstance(thr, (int, float)) and 0.0 < float(thr) < 1.0):
        problems.append("threshold must be a number strictly between 0 and 1")
    temp = meta.get("temperature", 1.0)
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp > 0):
        problems.append("temperature must be a positive number")
    if not isinstance(meta.get("model_version"), str) or not meta.get("model_version"):
        problems.append("model_version must be a non-empty string")
    cam = meta.get("cam")
    if not isinstance(cam, dict) or "weights" not in cam or "bias" not in cam:
        problems.append("cam must hold the classifier 'weights' and 'bias'")
    elif isinstance(names, list):
        w = np.asarray(cam["weights"], dtype=object)
        if w.ndim != 2 or w.shape[0] != len(names) or len(cam["bias"]) != len(names):
            problems.append("cam weights must be classes x features and bias one per class")
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("validation"), dict):
        problems.append("metrics.validation must be an object")
    ood = meta.get("ood")
    if ood is not None:
        if version < 2:
            problems.append("an ood section needs format_version 2")
        elif not isinstance(ood, dict) or not all(k in ood for k in _OOD_KEYS):
            problems.append(f"ood must hold {', '.join(_OOD_KEYS)}")
        elif not all(isinstance(ood[k], (int, float)) and math.isfinite(ood[k]) for k in ("cutoff", "view_cutoff")):
            problems.append("ood cut-offs must be finite numbers")
        elif ood["file"] != OOD_FILE:
            problems.append(f"ood.file must be {OOD_FILE!r}")
    prov = meta.get("provenance")
    if not isinstance(prov, dict):
        problems.append("provenance must be an object")
    else:
        for key in ("dataset", "hyperparameters", "code_version", "started_at", "finished_at", "device"):
            if key not in prov:
                problems.append(f"provenance.{key} is missing")
    if problems:
        raise BundleError("invalid bundle.json: " + "; ".join(problems))


def write_bundle(out_dir: str | os.PathLike, onnx_file: str | os.PathLike, meta: dict[str, Any],
                 report_dir: str | os.PathLike | None = None, ood: tuple[dict, bytes] | None = None) -> Path:
    """Validate ``meta`` and write a complete bundle into ``out_dir``.

    ``ood`` is the out-of-distribution check as (section without ``file``/``sha256``, ``ood.npz``
    bytes), from ``training_job.ood``; it becomes ``meta["ood"]`` and the bundle's ``ood.npz``.

    Files are assembled in a temporary sibling folder and moved into place last, so a failure
    never leaves a folder that looks like a valid bundle.
    """
    meta = dict(meta)
    if ood is not None:
        section, blob = ood
        meta["ood"] = {**section, "file": OOD_FILE, "sha256": hashlib.sha256(blob).hexdigest()}
    validate_meta(meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out))
    try:
        shutil.copyfile(onnx_file, staging / MODEL_FILE)
        if ood is not None:
            (staging / OOD_FILE).write_bytes(ood[1])
        if report_dir is not None:
            shutil.copytree(report_dir, staging / REPORT_DIR)
        meta["onnx_sha256"] = file_sha256(staging / MODEL_FILE)
        (staging / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        # bundle.json goes in last: its presence marks a finished bundle.
        stale = out / OOD_FILE
        if stale.exists() and not (staging / OOD_FILE).exists():
            stale.unlink()
        for name in (MODEL_FILE, OOD_FILE, REPORT_DIR):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            if (staging / name).exists():
                os.replace(staging / name, target)
        os.replace(staging / BUNDLE_JSON, out / BUNDLE_JSON)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def pack(bundle_dir: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """``model.tar.gz`` with the bundle's files at the archive root (SageMaker's layout)."""
    read_bundle(bundle_dir)  # never ship an invalid bundle
    src, dst = Path(bundle_dir), Path(archive)
    tmp = dst.with_name(dst.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(p.name for p in src.iterdir()):
            if name.startswith("."):
                continue
            tar.add(src / name, arcname=name)
    os.replace(tmp, dst)
    return dst


def unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a ``model.tar.gz`` into ``dest`` and return ``dest``.

    Only the bundle's own members are written (``bundle.json``, ``model.onnx``, ``ood.npz``,
    ``report/<file>``, with or without a leading ``./``), as regular files of mode 0644, each
    within :data:`MEMBER_MAX_BYTES` / :data:`REPORT_FILE_MAX_BYTES`, all within
    :data:`MAX_UNPACKED_BYTES`, at most :data:`MAX_ARCHIVE_MEMBERS` entries. Anything else (a link,
    a device, a name outside ``dest``, an unknown member, a name given twice) raises
    :class:`BundleError` naming the member, before a single file is written. The extraction is
    this function's own, so it holds on a Python whose ``tarfile`` filters can be bypassed.
    """
    dest = Path(dest)
    label = Path(archive).name
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _checked_members(tar, label)
            dest.mkdir(parents=True, exist_ok=True)
            for member, name in members:
                _extract(tar, member, dest, name, label)
    except tarfile.ReadError:
        raise BundleError(f"cannot unpack model archive {label}: not a tar archive "
                          "(plain, gzip, bzip2 or xz)") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise BundleError(f"cannot unpack model archive {label}: {reason}") from None
    return dest


def _checked_members(tar: tarfile.TarFile, label: str) -> list[tuple[tarfile.TarInfo, str]]:
    """Every entry of ``tar`` with its normalised name, once all of them passed the checks.
    Headers are read one by one, so a bomb is refused before it is inflated past the caps."""
    members: list[tuple[tarfile.TarInfo, str]] = []
    total = 0
    for member in tar:
        if len(members) >= MAX_ARCHIVE_MEMBERS:
            raise BundleError(f"model archive {label} has more than {MAX_ARCHIVE_MEMBERS} entries; "
                              "a model bundle has a handful")
        name = _member_name(member, label)
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise BundleError(f"model archive {label} unpacks to more than {MAX_UNPACKED_BYTES >> 20} MB; "
                              "refusing to unpack")
        members.append((member, name))
    names = [n for _, n in members]
    if BUNDLE_JSON not in names:
        raise BundleError(f"model archive {label} holds no {BUNDLE_JSON} at its top level: not a model bundle")
    for member, name in members:
        limit = _member_limit(name, member.isdir())
        if limit is None:
            raise BundleError(f"model archive {label} holds {_shown(name)}, which is not part of a model bundle "
                              f"({BUNDLE_JSON}, {MODEL_FILE}, {OOD_FILE}, {REPORT_DIR}/<file>)")
        if member.size > limit:
            raise BundleError(f"model archive {label}: {_shown(name)} is {member.size:,} bytes, over its limit "
                              f"of {limit:,}")
        if names.count(name) > 1 and not member.isdir():
            raise BundleError(f"model archive {label} holds {_shown(name)} more than once")
    return members


def _member_name(member: tarfile.TarInfo, label: str) -> str:
    """The entry's name relative to the archive root ("" for the root itself); raises for an
    entry that is not a regular file or folder, or whose name leaves the folder."""
    shown = _shown(member.name)
    if member.issym() or member.islnk():
        raise BundleError(f"model archive {label}: {shown} is a link; a model bundle holds only regular files "
                          "and folders")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise BundleError(f"model archive {label}: {shown} is not a regular file or folder (a device, FIFO or "
                          "sparse file); refusing to unpack")
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name == ".":
        name = ""
    parts = name.split("/")
    if member.name.startswith("/") or "\\" in name or (name and any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"model archive {label}: {shown} is not a plain path inside the archive; refusing to unpack")
    return name


def _member_limit(name: str, is_dir: bool) -> int | None:
    """The byte cap of a bundle member, 0 for its folders, None for a name a bundle never has."""
    if is_dir:
        return 0 if name in ("", REPORT_DIR) else None
    if name in MEMBER_MAX_BYTES:
        return MEMBER_MAX_BYTES[name]
    folder, _, file = name.partition("/")
    if folder == REPORT_DIR and _REPORT_FILE_NAME.match(file):
        return REPORT_FILE_MAX_BYTES
    return None


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, name: str, label: str) -> None:
    if not name:  # the archive's root: dest itself
        return
    target = dest / name
    if target.is_symlink() or target.parent.is_symlink():
        raise BundleError(f"cannot unpack model archive {label}: {target} is a symbolic link")
    if member.isdir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    src = tar.extractfile(member)
    assert src is not None  # a regular file
    # O_NOFOLLOW: a link planted at the target by anyone else is refused, never written through.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _shown(name: str) -> str:
    """A member name as quoted in an error: printable, at most 80 characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return repr(clean if len(clean) <= 80 else clean[:77] + "...")


def read_bundle(path: str | os.PathLike, unpack_to: str | os.PathLike | None = None) -> Bundle:
    """Open a bundle folder or a ``model.tar.gz`` (unpacked to ``unpack_to`` or a temp folder).
    Raises :class:`BundleError` naming the reason: a missing path, an archive that does not unpack,
    no ``bundle.json``, invalid metadata or a file that does not match its recorded checksum."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"bundle {p} does not exist")
    if p.is_file():
        dest = Path(unpack_to) if unpack_to else Path(tempfile.mkdtemp(prefix="bundle-"))
        p = unpack(p, dest)
    if not (p / BUNDLE_JSON).is_file():
        raise BundleError(f"{p} holds no {BUNDLE_JSON}: not a model bundle")
    try:
        meta = json.loads((p / BUNDLE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{BUNDLE_JSON} is not valid JSON: {exc}") from None
    validate_meta(meta)
    onnx = p / MODEL_FILE
    if not onnx.is_file():
        raise BundleError(f"bundle at {p} has no {MODEL_FILE}")
    expected = meta.get("onnx_sha256")
    if expected and file_sha256(onnx) != expected:
        raise BundleError(f"{MODEL_FILE} does not match the checksum recorded in {BUNDLE_JSON}")
    if meta.get("ood"):
        ood_path = p / OOD_FILE
        if not ood_path.is_file():
            raise BundleError(f"bundle at {p} names {OOD_FILE} in {BUNDLE_JSON} but has no such file")
        if file_sha256(ood_path) != meta["ood"]["sha256"]:
            raise BundleError(f"{OOD_FILE} does not match the checksum recorded in {BUNDLE_JSON}")
    return Bundle(p, meta)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
