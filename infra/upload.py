"""Upload a dataset of chest X-rays to S3 in the layout training expects, the _READY marker last.

    python -m infra.upload --data ../shared/data/chest_xray_224 --bucket my-data-bucket --name pneumonia-v1
    python -m infra.upload --data ./chest_xray --name kaggle --twin   # the running local twin

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

A dataset too small for the training entrypoint to validate on is uploaded with a warning
(:func:`shared.dataset.training_size_problem` gives the rule). A missing bucket, missing or rejected
credentials or denied access end the command with one line on stderr and exit status 1.
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
from shared.cli import HelpFormatter
from shared.dataset import (
    MARKER_NAME,
    DatasetLayoutError,
    build_manifest,
    scan_directory,
    training_size_problem,
)

from .aws_errors import describe, is_no_credentials, report_aws_failure
from .functions.common import DATASETS_PREFIX
from .twin.endpoints import TwinEndpointError, add_twin_arguments, check_endpoint, read_state

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
    too_small = training_size_problem(layout.counts())
    if too_small:
        log(f"warning: this dataset is too small to train and validate on: {too_small}")
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
        raise RuntimeError(f"{len(failures)} uploads failed (first: {key}: {describe(exc, f's3://{bucket}/{key}') or exc}); "
                           "run the command again to resume. "
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infra.upload", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--data", type=Path, required=True,
                    help="dataset root: train/NORMAL, train/PNEUMONIA, optionally val/ and test/ (Kaggle chest_xray layout)")
    ap.add_argument("--bucket", help="the stack's data bucket (its DataBucketName output; required, except with --twin: "
                                     "the twin's data bucket)")
    ap.add_argument("--name", required=True, help="dataset name: the images go to s3://BUCKET/datasets/NAME/")
    ap.add_argument("--endpoint-url", help="an S3-compatible endpoint (default: AWS S3; with --twin: the twin's)")
    ap.add_argument("--region", help="AWS region (default: the AWS CLI's, from AWS_REGION or ~/.aws/config)")
    ap.add_argument("--workers", type=int, default=8, help="parallel uploads")
    ap.add_argument("--retrain", action="store_true",
                    help="rewrite the marker even if the dataset is unchanged, which starts a new training run")
    add_twin_arguments(ap, endpoints=False)
    return ap


def _client_for(args: argparse.Namespace):
    """(S3 client, bucket) for the command line: the twin's (--twin) or AWS's / --endpoint-url's."""
    if args.twin:
        state = read_state(args.state_dir)
        endpoint = check_endpoint(args.endpoint_url or state.s3_endpoint, "s3", "--endpoint-url", args.state_dir)
        from .twin.servers import client

        return client("s3", endpoint, state.credentials), args.bucket or state.data_bucket
    if not args.bucket:
        raise TwinEndpointError("--bucket is required (or --twin for the local twin's data bucket)")
    if args.endpoint_url:
        check_endpoint(args.endpoint_url, "s3", "--endpoint-url")
    return s3_client(args.endpoint_url, args.region), args.bucket


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bucket = args.bucket
    try:
        s3, bucket = _client_for(args)
        r = upload_dataset(args.data, bucket, args.name, s3, args.workers, args.retrain,
                           progress=sys.stderr.isatty(), log=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("\nupload interrupted: the _READY marker was not written, so no training started; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    except (DatasetLayoutError, RuntimeError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - an AWS failure is told in one line; anything else is a bug
        if args.endpoint_url and not args.twin and is_no_credentials(exc):
            print("upload failed: no credentials for that endpoint: for the local twin pass --twin "
                  "(its credentials are in its state folder's twin.json)", file=sys.stderr)
            return 1
        return report_aws_failure(exc, "upload failed", f"s3://{bucket}/")
    print(f"{r.uploaded} uploaded, {r.skipped} already there; marker s3://{bucket}/{r.marker_key} "
          f"{'written' if r.marker_written else 'unchanged'}; counts {r.manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
