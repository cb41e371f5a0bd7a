"""Check an uploaded dataset against its ``_READY`` manifest before paying for a GPU.

Reads the marker version that started the run, lists ``datasets/<name>/``, and applies
:mod:`shared.dataset`: layout (both classes present in every split present), then the manifest
(counts and fingerprint agree with what is in S3, so a half-finished or changed upload never
trains). Returns the training channels for CreateTrainingJob (``train`` and ``val`` only) and
the dataset's evaluation set (its ``test/`` split) when it has one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

from shared.dataset import (
    EVALUATION_SPLIT,
    TRAINING_SPLITS,
    DatasetLayoutError,
    Layout,
    check_manifest,
    parse_manifest,
    scan_relpaths,
)

from .common import LOG, DatasetInvalid, StepContext, lambda_handler

_MAX_LISTED_IGNORED = 20


def _read_marker(s3: Any, bucket: str, key: str, version_id: str | None) -> tuple[str, bytes]:
    """The marker's bytes (the exact version that started the run) and the key that held it."""
    candidates = [key] + ([unquote_plus(key)] if unquote_plus(key) != key else [])
    for candidate in candidates:
        kwargs = {"Bucket": bucket, "Key": candidate}
        if version_id and version_id != "null":
            kwargs["VersionId"] = version_id
        try:
            return candidate, s3.get_object(**kwargs)["Body"].read()
        except s3.exceptions.NoSuchKey:
            continue
        except s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchVersion", "404", "InvalidArgument"):
                continue
            raise
    raise DatasetInvalid(f"the marker s3://{bucket}/{key} is gone (deleted or replaced before the run started)")


def list_relpaths(s3: Any, bucket: str, prefix: str) -> list[str]:
    rels = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rels.append(obj["Key"][len(prefix):])
    return rels


def _split_folder(layout: Layout, split: str) -> str | None:
    """The split's folder as uploaded (case kept), or None when the dataset has no such split."""
    paths = [p for paths in layout.files.get(split, {}).values() for p in paths]
    return paths[0].split("/", 1)[0] if paths else None


def evaluation_set(bucket: str, prefix: str, layout: Layout) -> dict[str, Any] | None:
    """The dataset's own evaluation set (its ``test/`` split), which is never a training channel."""
    folder = _split_folder(layout, EVALUATION_SPLIT)
    if folder is None:
        return None
    return {"source": "dataset", "uri": f"s3://{bucket}/{prefix}{folder}/", "counts": layout.counts()[EVALUATION_SPLIT]}


def channels(bucket: str, prefix: str, layout: Layout) -> list[dict[str, Any]]:
    """SageMaker InputDataConfig: ``train`` always, ``val`` when the dataset has one."""
    out = []
    for split in TRAINING_SPLITS:
        folder = _split_folder(layout, split)
        if folder is None:
            continue
        out.append({
            "ChannelName": split,
            "InputMode": "File",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/{prefix}{folder}/",
                                            "S3DataDistributionType": "FullyReplicated"}},
        })
    return out


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    run_info = state["run"]
    bucket, prefix = run_info["bucket"], run_info["prefix"]
    s3 = ctx.clients.s3
    marker_key, raw = _read_marker(s3, bucket, run_info["marker_key"], run_info.get("version_id"))
    prefix = marker_key[: len(marker_key) - len(marker_key.rsplit("/", 1)[-1])]
    try:
        manifest = parse_manifest(raw)
    except DatasetLayoutError as exc:
        raise DatasetInvalid(f"dataset {run_info['dataset']}: {exc}") from None
    layout = scan_relpaths(list_relpaths(s3, bucket, prefix))
    try:
        layout.check()
    except DatasetLayoutError as exc:
        raise DatasetInvalid(f"dataset {run_info['dataset']}: {exc}") from None
    problems = check_manifest(manifest, layout)
    if problems:
        raise DatasetInvalid(f"dataset {run_info['dataset']} does not match its _READY manifest: " + "; ".join(problems))
    if layout.ignored_classes:
        LOG.info("dataset %s: ignored class folders %s", run_info["dataset"], layout.ignored_classes)
    return {
        "name": run_info["dataset"],
        "uri": f"s3://{bucket}/{prefix}",
        "counts": layout.counts(),
        "file_count": len(layout.all_files()),
        "fingerprint": layout.fingerprint(),
        "ignored_classes": layout.ignored_classes,
        "ignored_files": [f"{rel}: {why}" for rel, why in layout.ignored_files[:_MAX_LISTED_IGNORED]],
        "ignored_file_count": len(layout.ignored_files),
        "channels": channels(bucket, prefix, layout),
        "evaluation_set": evaluation_set(bucket, prefix, layout),
    }


handler = lambda_handler(run)
