"""Images under an S3 prefix, listed and fetched for :func:`shared.scoring.score`.

Shared by the Evaluate step (a labelled evaluation set) and batch inference (any prefix). Objects
are fetched by a small thread pool in a bounded window, so memory stays at ``window`` images
whatever the size of the prefix, and the network overlaps the scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shared.dataset import EVALUATION_SPLIT, DatasetLayoutError, scan_relpaths
from shared.labels import CLASS_NAMES

from .common import parse_s3_uri

FETCH_WORKERS = 16
FETCH_WINDOW = 256
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # a file larger than this is refused unread (the API takes 4.5 MB)


class ObjectTooLarge(OSError):
    pass


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix ending in ``/`` unless empty)."""
    if uri.rstrip("/").count("/") == 2:  # s3://bucket
        return uri.rstrip("/")[5:], ""
    bucket, prefix = parse_s3_uri(uri)
    return bucket, prefix if prefix.endswith("/") or not prefix else prefix + "/"


def list_keys(s3: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """Every object under ``prefix`` as (key, size in bytes), in key order."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
    return sorted(found)


def labelled_images(s3: Any, uri: str) -> tuple[str, list[tuple[str, int]]]:
    """The labelled images of an evaluation set: (bucket, [(key, class index)]).

    ``uri`` is a prefix holding ``NORMAL/`` and ``PNEUMONIA/`` (case-insensitive), or a dataset
    root whose ``test/`` split holds them (contract 1). Raises :class:`DatasetLayoutError` when
    neither is there or a class is empty.
    """
    bucket, prefix = split_uri(uri)
    rels = [k[len(prefix):] for k, _ in list_keys(s3, bucket, prefix)]
    direct = scan_relpaths((f"{EVALUATION_SPLIT}/{r}" for r in rels), (EVALUATION_SPLIT,))
    if EVALUATION_SPLIT in direct.files:  # <prefix>/<CLASS>/<file>
        files = {c: [prefix + r.split("/", 1)[1] for r in v] for c, v in direct.files[EVALUATION_SPLIT].items()}
    else:  # <prefix>/test/<CLASS>/<file>
        root = scan_relpaths(rels)
        if EVALUATION_SPLIT not in root.files:
            raise DatasetLayoutError(f"the evaluation set {uri} holds neither NORMAL/ and PNEUMONIA/ folders nor a "
                                     f"{EVALUATION_SPLIT}/ split with them")
        files = {c: [prefix + r for r in v] for c, v in root.files[EVALUATION_SPLIT].items()}
    for cls in CLASS_NAMES:
        if not files[cls]:
            raise DatasetLayoutError(f"the evaluation set {uri} has no {cls} images")
    return bucket, [(key, CLASS_NAMES.index(cls)) for cls in CLASS_NAMES for key in files[cls]]


def image_keys(s3: Any, uri: str) -> tuple[str, list[tuple[str, int]]]:
    """Every object under a prefix that batch inference should score: (bucket, [(key, size)]).
    Folder markers are skipped; other non-image names are kept, so they are reported, not lost."""
    bucket, prefix = split_uri(uri)
    return bucket, [(k, n) for k, n in list_keys(s3, bucket, prefix) if not k.endswith("/")]


def fetcher(s3: Any, bucket: str, keys: Iterable[str], workers: int = FETCH_WORKERS,
            window: int = FETCH_WINDOW) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(key, read) in the order of ``keys``; ``read()`` returns the object's bytes or raises what
    fetching it raised (an :class:`OSError` or a botocore error), so the caller makes it a row."""

    def get(key: str) -> bytes:
        resp = s3.get_object(Bucket=bucket, Key=key)
        if int(resp.get("ContentLength") or 0) > MAX_IMAGE_BYTES:
            resp["Body"].close()
            raise ObjectTooLarge(f"larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
        return resp["Body"].read()

    keys = list(keys)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures: dict[int, Future] = {}
        for i, key in enumerate(keys):
            for j in range(i, min(i + window, len(keys))):
                if j not in futures:
                    futures[j] = pool.submit(get, keys[j])
            fut = futures.pop(i)
            yield key, fut.result
