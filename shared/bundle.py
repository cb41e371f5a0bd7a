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
_MAX_ARCHIVE_MEMBERS = 64
_MAX_UNPACKED_BYTES = 512 * 1024 * 1024


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
    """Extract a ``model.tar.gz`` safely (no links, no paths outside ``dest``, bounded size)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > _MAX_ARCHIVE_MEMBERS * 16:
                raise BundleError(f"model archive has {len(members)} entries; refusing to unpack")
            if sum(m.size for m in members) > _MAX_UNPACKED_BYTES:
                raise BundleError("model archive unpacks to more than 512 MB; refusing to unpack")
            tar.extractall(dest, filter="data")
    except tarfile.ReadError:
        raise BundleError(f"cannot unpack model archive {Path(archive).name}: not a tar archive "
                          "(plain, gzip, bzip2 or xz)") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise BundleError(f"cannot unpack model archive {Path(archive).name}: {reason}") from None
    return dest


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
            raise BundleError(f"model archive {Path(path).name} holds no {BUNDLE_JSON} at its top level: "
                              "not a model bundle")
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
