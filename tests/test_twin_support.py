"""Helpers for the local twin's tests: small real datasets, tiny training settings, HTTP calls.

Holds no tests itself; the ``test_twin_*`` modules import from it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import DATA_224

from shared.labels import CLASS_NAMES

# The smallest training that still runs the whole entrypoint: seed CNN, 64 px, one epoch.
TINY_HP = {"architecture": "seed_cnn", "width": "8", "image-size": "64", "epochs": "1", "limit-per-class": "0",
           "batch-size": "16", "workers": "2"}
# Thresholds a tiny model clears (the gate logic is what is tested, not the model).
LOW_GATE = {"roc_auc": 0.0, "accuracy": 0.0, "sensitivity": 0.0, "specificity": 0.0}


def subset(dest: Path, per_class: int = 30, offset: int = 0, broken: dict[str, int] | None = None,
           only_broken: tuple[str, ...] = ()) -> Path:
    """``dest/train/{NORMAL,PNEUMONIA}`` as symlinks to real X-rays (the data stays in ../shared).

    ``broken`` adds that many unreadable .jpeg files to a class; a class in ``only_broken`` gets
    unreadable files only.
    """
    for cls in CLASS_NAMES:
        d = dest / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        if cls not in only_broken:
            for src in sorted((DATA_224 / "train" / cls).iterdir())[offset:offset + per_class]:
                (d / src.name).symlink_to(src)
        n_broken = (broken or {}).get(cls, 0) + (per_class if cls in only_broken else 0)
        for i in range(n_broken):
            (d / f"broken-{i:03d}.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes([i % 256]) * 40)
    return dest


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def call_json(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    status, _, raw = call(url, method, body, headers, timeout)
    return status, json.loads(raw) if raw else None


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (to check that nothing was left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = Path(f"/proc/{entry}/stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if text in cmd and state != "Z":
            found.append((int(entry), cmd.strip()))
    return found
