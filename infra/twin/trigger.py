"""The cloud's trigger, locally: marker events, the EventBridge rule, one execution per name.

In the cloud, S3 sends an "Object Created" event to EventBridge for every object in the data
bucket; the ``DatasetReady`` rule passes on only ``datasets/*/_READY`` keys; the starter turns the
event into the workflow's input (:func:`infra.functions.starter.initial_state`) and starts an
execution named after the marker version, which Step Functions refuses to start twice.

Here :class:`MarkerWatcher` plays S3's part (it lists the versions of the data bucket's markers
and emits the same event for each marker version it has not seen, however close together they
were written), :func:`matches_rule` the rule's (its
pattern is the stack's, :func:`infra.names.dataset_ready_pattern`), the
starter's own :func:`initial_state` builds the input, and :class:`Executions` keeps execution
names unique across runs of the twin (one JSON file per execution in the state folder).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from shared.dataset import MARKER_NAME

from ..functions.common import DATASETS_PREFIX
from ..functions.starter import marker_event
from ..names import dataset_ready_pattern


def _wildcard(pattern: str) -> re.Pattern[str]:
    # EventBridge's '*' matches any run of characters, '/' included; nothing else is special.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _value_matches(value: Any, allowed: list[Any]) -> bool:
    for entry in allowed:
        if isinstance(entry, dict):
            if set(entry) != {"wildcard"}:
                raise ValueError(f"the twin does not implement this EventBridge filter: {entry}")
            if isinstance(value, str) and _wildcard(entry["wildcard"]).fullmatch(value):
                return True
        elif value == entry:
            return True
    return False


def matches_pattern(event: Any, pattern: dict[str, Any]) -> bool:
    """Whether ``event`` matches an EventBridge event pattern made of exact values and wildcards."""
    if not isinstance(event, dict):
        return False
    for name, expected in pattern.items():
        if name not in event:
            return False
        if isinstance(expected, dict):
            if not matches_pattern(event[name], expected):
                return False
        elif not _value_matches(event[name], expected):
            return False
    return True


def matches_rule(event: dict[str, Any], data_bucket: str) -> bool:
    return matches_pattern(event, dataset_ready_pattern(data_bucket))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Executions:
    """Execution records by name; :meth:`start` refuses a name that exists (ExecutionAlreadyExists)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return None

    def start(self, name: str, state: dict[str, Any]) -> bool:
        record = {"name": name, "status": "RUNNING", "started_at": _now(), "pid": os.getpid(), "input": state,
                  "attempt": 1}
        try:
            fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        return True

    def _write(self, record: dict[str, Any]) -> None:
        path = self._path(record["name"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)

    def finish(self, name: str, status: str, state: dict[str, Any], path: list[str]) -> dict[str, Any]:
        record = self.get(name) or {"name": name, "started_at": _now(), "attempt": 1}
        record.update({"status": status, "stopped_at": _now(), "output": state, "path": path})
        record.pop("pid", None)
        self._write(record)
        return record

    def interrupted(self) -> list[dict[str, Any]]:
        """Executions left RUNNING by a twin that is gone (stopped mid-run); they can be run again."""
        out = []
        for p in sorted(self.folder.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(p.read_text())
                if rec.get("status") == "RUNNING" and not (rec.get("pid") == os.getpid() or _pid_alive(rec.get("pid", 0))):
                    out.append(rec)
        return out

    def resume(self, name: str) -> dict[str, Any] | None:
        """Take over an interrupted execution: it runs again under the same name (training resumes
        from its checkpoints)."""
        rec = self.get(name)
        if rec is None or rec.get("status") != "RUNNING":
            return None
        rec.update({"pid": os.getpid(), "attempt": int(rec.get("attempt", 1)) + 1, "resumed_at": _now()})
        self._write(rec)
        return rec

    def latest(self, dataset: str | None = None) -> dict[str, Any] | None:
        recs = []
        for p in self.folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(p.read_text())
                if dataset is None or rec.get("input", {}).get("run", {}).get("dataset") == dataset:
                    recs.append(rec)
        return max(recs, key=lambda r: (r.get("stopped_at") or r.get("started_at") or ""), default=None)


class MarkerWatcher:
    """S3's event source for the data bucket: one "Object Created" event per new marker version."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self._seen: set[tuple[str, str]] = set()

    def marker(self, key: str) -> dict[str, Any] | None:
        """The event for the current version of the marker at ``key`` (None when there is none)."""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
        except self.s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        modified = head.get("LastModified")
        when = modified.strftime("%Y-%m-%dT%H:%M:%SZ") if modified else _now()
        version = head.get("VersionId")
        return marker_event(self.bucket, key, version_id=version if version and version != "null" else None,
                            etag=(head.get("ETag") or "").strip('"') or None, time=when)

    def current(self) -> list[dict[str, Any]]:
        """Events for the current version of every dataset's marker (marking every version seen)."""
        events = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=DATASETS_PREFIX,
                                                                    Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                key = cp["Prefix"] + MARKER_NAME
                self._seen.update((key, v["VersionId"]) for v in self._versions(key))
                event = self.marker(key)
                if event is not None:
                    events.append(event)
        return events

    def poll(self) -> list[dict[str, Any]]:
        """Events for marker versions not seen before by this watcher, oldest first.

        Every version counts, as S3 sends one event per object version: two markers written
        between two polls start two runs, as they do in the cloud.
        """
        events = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=DATASETS_PREFIX,
                                                                    Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                key = cp["Prefix"] + MARKER_NAME
                for version in self._versions(key):
                    ident = (key, version["VersionId"])
                    if ident in self._seen:
                        continue
                    self._seen.add(ident)
                    modified = version.get("LastModified")
                    events.append(marker_event(
                        self.bucket, key, version_id=version["VersionId"],
                        etag=(version.get("ETag") or "").strip('"') or None,
                        time=modified.strftime("%Y-%m-%dT%H:%M:%SZ") if modified else _now()))
        return events

    def _versions(self, key: str) -> list[dict[str, Any]]:
        """The versions of ``key`` (not delete markers), oldest first."""
        found = []
        for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key):
            found += [v for v in page.get("Versions", []) if v.get("Key") == key]
        return sorted(found, key=lambda v: (v.get("LastModified") is None, v.get("LastModified")))
