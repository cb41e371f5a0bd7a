"""Start one workflow run per ``_READY`` marker version.

EventBridge delivers S3 "Object Created" events for ``datasets/*/_READY`` to this function
(image uploads never match the rule). The execution is named :func:`common.run_id` of the dataset
and the marker's version id (or ETag), so a repeated or retried event asks Step Functions for an
execution that already exists: it answers ``ExecutionAlreadyExists`` (or, while the first one
runs with the same input, returns it) and nothing new starts.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .common import (
    CHECKPOINTS_PREFIX,
    LOG,
    MODELS_PREFIX,
    Settings,
    StepContext,
    dataset_name_from_key,
    lambda_handler,
    marker_version,
    run_id,
)


def marker_event(bucket: str, key: str, version_id: str | None = None, etag: str | None = None,
                 time: str = "1970-01-01T00:00:00Z") -> dict[str, Any]:
    """The EventBridge event S3 sends for a new object (for tests and the local twin)."""
    obj: dict[str, Any] = {"key": key, "size": 0}
    if version_id:
        obj["version-id"] = version_id
    if etag:
        obj["etag"] = etag
    return {"version": "0", "source": "aws.s3", "detail-type": "Object Created", "time": time,
            "detail": {"version": "0", "bucket": {"name": bucket}, "object": obj, "reason": "PutObject"}}


def initial_state(event: dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """The workflow's input for a marker event, or None when the event is not a dataset marker."""
    detail = event.get("detail") or {}
    bucket = (detail.get("bucket") or {}).get("name")
    obj = detail.get("object") or {}
    key = obj.get("key") or ""
    dataset = dataset_name_from_key(key)
    version = marker_version(obj.get("version-id"), obj.get("etag"))
    if not bucket or dataset is None or not version:
        return None
    rid = run_id(dataset, version)
    return {
        "run": {
            "run_id": rid,
            "job_name": rid,
            "dataset": dataset,
            # SageMaker tag values allow letters, digits, spaces and _.:/=+-@ only.
            "dataset_tag": re.sub(r"[^\w .:/=+\-@]", "-", dataset)[:256],
            "bucket": bucket,
            "marker_key": key,
            "prefix": key[: -len(key.rsplit("/", 1)[-1])],
            "version_id": obj.get("version-id"),
            "etag": obj.get("etag"),
            "event_time": event.get("time"),
            "checkpoint_uri": f"s3://{settings.artifacts_bucket}/{CHECKPOINTS_PREFIX}{rid}/",
            "output_uri": f"s3://{settings.artifacts_bucket}/{MODELS_PREFIX}",
        }
    }


def run(event: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    state = initial_state(event, ctx.settings)
    if state is None:
        LOG.warning("ignoring an event that is not a datasets/<name>/_READY marker: %s",
                    json.dumps(event.get("detail", {}).get("object", {}))[:300])
        return {"status": "ignored"}
    rid = state["run"]["run_id"]
    sfn = ctx.clients.stepfunctions
    try:
        resp = sfn.start_execution(stateMachineArn=ctx.settings.state_machine_arn, name=rid,
                                   input=json.dumps(state, sort_keys=True))
    except sfn.exceptions.ExecutionAlreadyExists:
        LOG.info("run %s already exists for this marker version; nothing started", rid)
        return {"status": "duplicate", "run_id": rid}
    LOG.info("started run %s for dataset %s", rid, state["run"]["dataset"])
    return {"status": "started", "run_id": rid, "execution_arn": resp["executionArn"]}


handler = lambda_handler(run)
