"""Upload a dataset to S3 in the layout training expects, marker last (contract 1).

    python -m infra.upload --data ../shared/data/chest_xray_224 --bucket my-data-bucket --name pneumonia-v1
    python -m infra.upload --data ./chest_xray --bucket b --name kaggle --endpoint-url http://127.0.0.1:8333

Images go to ``s3://BUCKET/datasets/NAME/{train,val,test}/{NORMAL,PNEUMONIA}/...`` (``test/`` is the
evaluation set, which training never reads) in parallel, with a
progress bar. It is resumable: an object already there with the same size and checksum is skipped.
The checksum is the MD5 that S3 reports as the ETag of a single-part upload where the bucket's
encryption keeps it so (SSE-S3, S3-compatible servers); under SSE-KMS the ETag is not an MD5, so
each upload also records its SHA-256 in the object's metadata and a HEAD compares that. Only when every image is there is
``datasets/NAME/_READY`` written, holding the manifest (counts per split and class, the
fingerprint of the file list); that marker, and nothing else, starts training. An unchanged
dataset keeps its marker, so re-running the command does not start a second run (``--retrain``
rewrites it on purpose).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from shared.bundle import file_sha256
from shared.dataset import MARKER_NAME, DatasetLayoutError, build_manifest, scan_directory

from .functions.common import DATASETS_PREFIX

SHA256_METADATA = "sha256"  # x-amz-meta-sha256
CONTENT_TYPES = {".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom"}


@dataclass
class UploadResult:
    uploaded: int
    skipped: int
    marker_written: bool
    marker_key: str
    manifest: dict


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32,
                 s3={"addressing_style": "path"} if endpoint_url else None)
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def existing_objects(s3, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (obj["Size"], obj.get("ETag", "").strip('"'))
    return found


def upload_dataset(data: Path, bucket: str, name: str, s3, workers: int = 8, retrain: bool = False,
                   progress: bool = False, log=print) -> UploadResult:
    if not name or "/" in name or name.startswith("."):
        raise DatasetLayoutError(f"dataset name {name!r} must be a single path segment")
    layout = scan_directory(data)
    layout.check()
    for k, n in layout.ignored_classes.items():
        log(f"ignoring {k} ({n} files): not a NORMAL/PNEUMONIA class folder or a train/val/test split")
    prefix = f"{DATASETS_PREFIX}{name}/"
    marker_key = prefix + MARKER_NAME
    there = existing_objects(s3, bucket, prefix)

    def unchanged(rel: str) -> bool:
        path, key = data / rel, prefix + rel
        have = there.get(key)
        if not have or have[0] != path.stat().st_size:
            return False
        if have[1] == _md5(path):
            return True
        try:
            meta = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {})
        except Exception:  # noqa: BLE001 - unknown state: upload it again
            return False
        return meta.get(SHA256_METADATA) == file_sha256(path)

    rels = layout.all_files()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        same = list(pool.map(unchanged, rels))
    todo = [(data / rel, prefix + rel) for rel, ok in zip(rels, same, strict=True) if not ok]
    skipped = len(rels) - len(todo)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"upload {name}")

    def put(item):
        path, key = item
        extra = {"ContentType": CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                 "Metadata": {SHA256_METADATA: file_sha256(path)}}
        s3.upload_file(str(path), bucket, key, ExtraArgs=extra)

    failures = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(put, item): item for item in todo}
        for fut in as_completed(futures):
            if fut.exception() is not None:
                failures.append((futures[fut][1], fut.exception()))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if failures:
        key, exc = failures[0]
        raise RuntimeError(f"{len(failures)} uploads failed (first: {key}: {exc}); run the command again to resume. "
                           "The _READY marker was not written, so no training started.")

    manifest = build_manifest(name, layout, dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    marker_written = True
    if marker_key in there and not retrain:
        try:
            old = json.loads(s3.get_object(Bucket=bucket, Key=marker_key)["Body"].read())
        except (ValueError, KeyError):
            old = {}
        if old.get("fingerprint") == manifest["fingerprint"] and old.get("counts") == manifest["counts"]:
            marker_written = False
            log("dataset unchanged and its _READY marker is in place: no new training run (use --retrain to start one)")
    if marker_written:
        s3.put_object(Bucket=bucket, Key=marker_key, Body=json.dumps(manifest, indent=2).encode(),
                      ContentType="application/json")
    return UploadResult(len(todo), skipped, marker_written, marker_key, manifest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset root with train/ (and val/) class folders")
    ap.add_argument("--bucket", required=True, help="the stack's data bucket")
    ap.add_argument("--name", required=True, help="dataset name: s3://BUCKET/datasets/NAME/")
    ap.add_argument("--endpoint-url", help="an S3-compatible endpoint (the local twin's server)")
    ap.add_argument("--region")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--retrain", action="store_true", help="rewrite the marker even if the dataset is unchanged")
    args = ap.parse_args(argv)
    try:
        r = upload_dataset(args.data, args.bucket, args.name, s3_client(args.endpoint_url, args.region),
                           args.workers, args.retrain, progress=sys.stderr.isatty())
    except (DatasetLayoutError, RuntimeError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    print(f"{r.uploaded} uploaded, {r.skipped} already there; marker s3://{args.bucket}/{r.marker_key} "
          f"{'written' if r.marker_written else 'unchanged'}; counts {r.manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
