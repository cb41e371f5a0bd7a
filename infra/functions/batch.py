"""Batch inference: every image under an S3 prefix scored with one model, one CSV row per file.

The cloud runs it as its own state machine (``BatchPredict``): a Step Functions Distributed Map
reads the S3 listing of the prefix and hands batches of keys to :func:`score_batch` (many Lambdas
at once; each writes one part CSV), then :func:`merge` joins the parts into the output CSV. The
local twin runs the same two functions over the same listing in a thread pool
(:func:`run_locally`). ``python -m infra.batch_predict`` starts either and shows progress.

A row: ``key, label, probability, threshold, model_version, error_code, error``. A file that is
not a usable X-ray (unreadable, not an image, refused) gets its error code and reason and no
prediction; it never stops the batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.bundle import BundleError
from shared.labels import CLASS_NAMES

from .common import LOG, StepContext, StepError, download, lambda_handler, parse_s3_uri
from .images import fetcher, image_keys, split_uri

COLUMNS = ("key", "label", "probability", "threshold", "model_version", "error_code", "error")
BATCH_OUTPUT_PREFIX = "batch/"  # outputs (and their work parts) go here in the data bucket (the stack's IAM says so)
ITEMS_PER_BATCH = 100  # keys per Lambda invocation: ~10 s of scoring, far from the 15-minute limit
PARTS_FOLDER = "parts/"

_loaded: dict[str, Any] = {}  # sha256 -> OnnxPredictor, kept while the Lambda container is warm


class BatchError(StepError):
    pass


def location_problem(input_uri: str, output_uri: str, data_bucket: str) -> str | None:
    """Why a batch may not read ``input_uri`` and write ``output_uri``, in one line; None when it may.

    The rules the stack's permissions enforce in the cloud, and the twin checks the same way: both
    ``s3://`` URIs; the input anywhere in ``data_bucket``; the output a ``.csv`` object under
    ``data_bucket``'s ``batch/`` prefix (never the artifacts bucket), and not under the input
    prefix (a CSV there would be scored by every later batch of that prefix)."""
    where = f"s3://{data_bucket}/{BATCH_OUTPUT_PREFIX}NAME.csv"
    for option, uri in (("--input", input_uri), ("--output", output_uri)):
        if not uri.startswith("s3://"):
            return (f"{option} {uri} is not an s3:// URI: batch reads and writes S3 only"
                    + (f" (use --output {where}, then download it)" if option == "--output" else ""))
    in_bucket, in_prefix = split_uri(input_uri)
    try:
        out_bucket, out_key = parse_s3_uri(output_uri)
    except StepError:
        return f"--output {output_uri} names no object: use {where}"
    if in_bucket != data_bucket:
        return f"--input must be in the data bucket s3://{data_bucket}/, not s3://{in_bucket}/"
    if out_bucket != data_bucket or not out_key.startswith(BATCH_OUTPUT_PREFIX):
        return f"--output must be under s3://{data_bucket}/{BATCH_OUTPUT_PREFIX}, not s3://{out_bucket}/{out_key}"
    if not out_key.endswith(".csv"):
        return f"--output {output_uri} must name a .csv object"
    if out_key.startswith(in_prefix):
        return (f"--output {output_uri} is inside the input prefix s3://{in_bucket}/{in_prefix}: later batches "
                "of that prefix would score the CSV; write it elsewhere under " + f"s3://{data_bucket}/{BATCH_OUTPUT_PREFIX}")
    return None


def predictor_for(s3: Any, model_uri: str, sha256: str) -> Any:
    """The model's predictor, downloaded once per container and checked against ``sha256``."""
    from shared.bundle import read_bundle
    from shared.predictor import OnnxPredictor

    if sha256 not in _loaded:
        work = Path(tempfile.mkdtemp(prefix="batch-model-"))
        got = download(s3, model_uri, work / "model.tar.gz")
        if got != sha256:
            raise BatchError(f"{model_uri} has SHA-256 {got}, not the {sha256} the batch was started with")
        try:
            _loaded[sha256] = OnnxPredictor(read_bundle(work / "model.tar.gz", unpack_to=work / "bundle"))
        except BundleError as exc:
            raise BatchError(f"{model_uri} is not a valid bundle: {exc}") from None
    return _loaded[sha256]


def rows_csv(rows: list[Any], predictor: Any, header: bool) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(COLUMNS)
    threshold, version = predictor.bundle.threshold, predictor.bundle.version
    for r in rows:
        if r.ok:
            p = r.probabilities[0]
            w.writerow([r.key, CLASS_NAMES[1] if p >= threshold else CLASS_NAMES[0], f"{p:.6f}", f"{threshold:.6f}",
                        version, "", ""])
        else:
            w.writerow([r.key, "", "", f"{threshold:.6f}", version, r.error_code, r.error])
    return buf.getvalue().encode()


def score_batch(event: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """One Distributed Map batch: ``{"Items": [{"Key": ...}, ...], "BatchInput": {"bucket",
    "model_uri", "sha256", "work_prefix"}}`` -> a part CSV under ``work_prefix``; counts."""
    from shared.scoring import score

    spec = event["BatchInput"]
    keys = [item["Key"] for item in event["Items"] if not item["Key"].endswith("/")]
    s3 = ctx.clients.s3
    predictor = predictor_for(s3, spec["model_uri"], spec["sha256"])
    # refuse=True: what POST /predict refuses with 422 not_a_chest_xray is refused here too
    rows = list(score(((k, None, read) for k, read in fetcher(s3, spec["bucket"], keys)), [predictor], refuse=True))
    work_bucket, work_prefix = parse_s3_uri(spec["work_uri"])
    part = f"{work_prefix.rstrip('/')}/{PARTS_FOLDER}{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:24]}.csv"
    s3.put_object(Bucket=work_bucket, Key=part, ContentType="text/csv", Body=rows_csv(rows, predictor, header=False))
    refused = sum(1 for r in rows if not r.ok)
    return {"part": part, "scored": len(rows) - refused, "refused": refused}


def merge(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Join every part under ``state["work_uri"]`` into ``state["output_uri"]`` (header first, rows
    sorted by key); counts of scored and refused files."""
    s3 = ctx.clients.s3
    work_bucket, work_prefix = parse_s3_uri(state["work_uri"])
    parts = [o for o in _list(s3, work_bucket, f"{work_prefix.rstrip('/')}/{PARTS_FOLDER}")]
    rows: list[list[str]] = []
    for key in parts:
        text = s3.get_object(Bucket=work_bucket, Key=key)["Body"].read().decode()
        rows += list(csv.reader(io.StringIO(text)))
    rows.sort(key=lambda r: r[0])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(rows)
    out_bucket, out_key = parse_s3_uri(state["output_uri"])
    s3.put_object(Bucket=out_bucket, Key=out_key, ContentType="text/csv", Body=buf.getvalue().encode())
    for key in parts:
        s3.delete_object(Bucket=work_bucket, Key=key)
    refused = sum(1 for r in rows if r[5])
    LOG.info("batch wrote %d rows (%d refused) to %s", len(rows), refused, state["output_uri"])
    return {"output_uri": state["output_uri"], "rows": len(rows), "scored": len(rows) - refused, "refused": refused}


def _list(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def run_locally(job: dict[str, Any], ctx: StepContext, workers: int = 2,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The twin's Distributed Map: the same listing, batches and merge, in a thread pool.

    ``job``: ``{"input_uri", "output_uri", "work_uri", "model_uri", "sha256"}``; ``progress(done,
    total)`` is called after each batch."""
    bucket, _ = split_uri(job["input_uri"])
    _, listed = image_keys(ctx.clients.s3, job["input_uri"])
    batches = [listed[i:i + ITEMS_PER_BATCH] for i in range(0, len(listed), ITEMS_PER_BATCH)]
    spec = {"bucket": bucket, "model_uri": job["model_uri"], "sha256": job["sha256"], "work_uri": job["work_uri"]}
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(score_batch, {"Items": [{"Key": k} for k, _ in b], "BatchInput": spec}, ctx)
                   for b in batches]
        for fut in futures:
            fut.result()
            done += 1
            if progress:
                progress(done, len(batches))
    return merge(job, ctx)


handler = lambda_handler(score_batch)
merge_handler = lambda_handler(merge)
