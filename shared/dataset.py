"""The dataset layout (contract 1), the dataset fingerprint and the patient key.

One definition for the three places that look at a dataset: the upload command (local files),
the cloud-side validation step (S3 keys) and the training job (channel folders). All of them work
on *relative paths* (``train/NORMAL/IM-0115-0001.jpeg``), so an S3 listing and a folder walk give
the same answer.

Layout: ``<root>/train/<CLASS>/<file>`` with an optional ``<root>/val/<CLASS>/<file>``; class
folders match :data:`shared.labels.CLASS_NAMES` case-insensitively; other class folders (COVID,
...) are ignored and reported. The Kaggle copy's ``test/`` split is reported and never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .imaging import FILE_EXTENSIONS
from .labels import CLASS_NAMES, class_index

SPLITS = ("train", "val")
MARKER_NAME = "_READY"
MANIFEST_FORMAT = 1

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # PNEUMONIA: person1000_bacteria_2931.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),  # NORMAL: IM-0115-0001, NORMAL2-IM-0468-0001
)


class DatasetLayoutError(ValueError):
    """The dataset cannot be used as it is; the message names what is wrong and where."""


def patient_key(filename: str) -> str:
    """The child an image belongs to: ``personN`` (PNEUMONIA) or ``IM-NNNN`` / ``NORMAL2-IM-NNNN``.

    A file name matching neither rule is its own group.
    """
    name = PurePosixPath(filename).name
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return m.group(1)
    return PurePosixPath(name).stem


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in FILE_EXTENSIONS and not PurePosixPath(name).name.startswith(".")


@dataclass
class Layout:
    """What a dataset holds, split -> canonical class -> relative paths (sorted)."""

    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    ignored_classes: dict[str, int] = field(default_factory=dict)  # "train/COVID" -> file count
    ignored_files: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: len(v) for c, v in classes.items()} for s, classes in self.files.items()}

    def all_files(self) -> list[str]:
        return sorted(p for classes in self.files.values() for paths in classes.values() for p in paths)

    def fingerprint(self) -> str:
        return fingerprint(self.all_files())

    def check(self, require_val: bool = False) -> None:
        """Raise :class:`DatasetLayoutError` when training could not use this dataset."""
        if "train" not in self.files:
            seen = sorted({p.split("/", 1)[0] for p in self.ignored_classes} | {p.split("/", 1)[0] for p, _ in self.ignored_files})
            raise DatasetLayoutError(
                "no train/NORMAL and train/PNEUMONIA folders found"
                + (f" (top-level entries seen: {', '.join(seen[:10])})" if seen else " (the dataset is empty)")
                + "; expected <root>/train/{NORMAL,PNEUMONIA}/*.jpeg as in the Kaggle chest_xray layout"
            )
        splits = ["train", "val"] if require_val else [s for s in SPLITS if s in self.files]
        for split in splits:
            for cls in CLASS_NAMES:
                if not self.files.get(split, {}).get(cls):
                    raise DatasetLayoutError(f"class {cls} in split '{split}' has no images ({split}/{cls}/ is missing or empty)")


def scan_relpaths(relpaths: Iterable[str], splits: tuple[str, ...] = SPLITS) -> Layout:
    """Sort relative paths (``split/CLASS/file``) into a :class:`Layout`; other splits are reported."""
    layout = Layout()
    ignored: Counter[str] = Counter()
    for rel in sorted(set(relpaths)):
        parts = PurePosixPath(rel).parts
        if not parts or parts[-1] == MARKER_NAME or parts[-1].startswith("."):
            continue
        if len(parts) != 3:
            layout.ignored_files.append((rel, "not in a <split>/<class>/ folder"))
            continue
        split, cls_folder, name = parts
        split_l = split.lower()
        if split_l not in splits:
            ignored[f"{split}"] += 1
            continue
        try:
            cls = CLASS_NAMES[class_index(cls_folder)]
        except KeyError:
            ignored[f"{split}/{cls_folder}"] += 1
            continue
        if not is_image_name(name):
            layout.ignored_files.append((rel, f"extension not one of {sorted(set(FILE_EXTENSIONS))}"))
            continue
        layout.files.setdefault(split_l, {c: [] for c in CLASS_NAMES})[cls].append(rel)
    layout.ignored_classes = dict(sorted(ignored.items()))
    return layout


def scan_directory(root: str | os.PathLike) -> Layout:
    """The layout of a dataset folder (``root/train/...``); a Kaggle ``chest_xray/`` works as is."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            rels.append(Path(dirpath, f).relative_to(root).as_posix())
    return scan_relpaths(rels)


def scan_channel(channel_dir: str | os.PathLike, split: str) -> Layout:
    """The layout of one training channel folder (class folders directly under it)."""
    root = Path(channel_dir)
    if not root.is_dir():
        raise DatasetLayoutError(f"channel '{split}' folder {root} does not exist")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            rels.append(f"{split}/" + Path(dirpath, f).relative_to(root).as_posix())
    return scan_relpaths(rels, (split,))


def fingerprint(relpaths: Iterable[str]) -> str:
    """SHA-256 of the sorted relative paths, one per line: the dataset's identity in provenance."""
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        h.update(rel.encode("utf-8") + b"\n")
    return h.hexdigest()


def build_manifest(name: str, layout: Layout, created_at: str) -> dict[str, Any]:
    """The ``_READY`` marker's JSON: counts per split and class, and the fingerprint."""
    return {
        "format": MANIFEST_FORMAT,
        "dataset": name,
        "counts": layout.counts(),
        "file_count": len(layout.all_files()),
        "fingerprint": layout.fingerprint(),
        "ignored_classes": layout.ignored_classes,
        "created_at": created_at,
    }


def check_manifest(manifest: Any, layout: Layout) -> list[str]:
    """Differences between a marker's manifest and what the dataset holds (empty when they agree)."""
    if not isinstance(manifest, dict):
        return ["the _READY marker is not a JSON object"]
    problems = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT}")
    if manifest.get("counts") != layout.counts():
        problems.append(f"manifest counts {manifest.get('counts')} differ from the files found {layout.counts()}")
    if manifest.get("fingerprint") != layout.fingerprint():
        problems.append("manifest fingerprint differs from the file list found (files added, removed or renamed)")
    return problems


def parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetLayoutError(f"the _READY marker is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DatasetLayoutError("the _READY marker must hold a JSON object")
    return doc
