"""Start one workflow run per ``_READY`` marker version.

EventBridge delivers S3 "Object Created" events for ``datasets/*/_READY`` to this function
(image uploads never match the rule). The execution is named :func:`common.run_id` of the dataset
and the marker's version id (or ETag), so a repeated or retried event asks Step Functions for an
execution that already exists: it answers ``ExecutionAlreadyExists`` (or, while the first one
runs with the same input, returns it) and nothing new starts.

With a daily cap (``maxTrainingRunsPerDay``, 0 = none), a marker that would start one run more
than the cap since midnight UTC starts nothing: the starter writes the reason to
``runs/refused/<run id>.json`` in the artifacts bucket, publishes it to the notification topic and
returns ``{"status": "refused"}``. The count is the state machine's own execution history, so there
is no counter to drift. Writing the marker again (a new version) after midnight UTC trains.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from .common import (
    CHECKPOINTS_PREFIX,
    LOG,
    MODELS_PREFIX,
    REFUSED_RUNS_PREFIX,
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


def runs_started_since(sfn: Any, state_machine_arn: str, since: dt.datetime) -> tuple[int, set[str]]:
    """(executions started at or after ``since``, their names), from ListExecutions (any status)."""
    names: set[str] = set()
    for page in sfn.get_paginator("list_executions").paginate(stateMachineArn=state_machine_arn):
        for execution in page.get("executions", []):
            started = execution["startDate"]
            if started.tzinfo is None:
                started = started.replace(tzinfo=dt.UTC)
            if started >= since:
                names.add(execution["name"])
    return len(names), names


def refuse(state: dict[str, Any], ctx: StepContext, started: int, now: dt.datetime) -> dict[str, Any]:
    """Record and announce a marker the daily cap stops; nothing is started."""
    run = state["run"]
    cap = ctx.settings.max_runs_per_day
    reason = (f"Dataset {run['dataset']} was not trained: {started} training runs already started today "
              f"(since 00:00 UTC), and maxTrainingRunsPerDay is {cap}. Write its _READY marker again after "
              "00:00 UTC, or deploy with a higher maxTrainingRunsPerDay. The model in service is unchanged.")
    key = f"{REFUSED_RUNS_PREFIX}{run['run_id']}.json"
    record = {"status": "refused", "reason": reason, "runs_started_today": started, "max_runs_per_day": cap,
              "refused_at": now.isoformat().replace("+00:00", "Z"), "run": run}
    ctx.clients.s3.put_object(Bucket=ctx.settings.artifacts_bucket, Key=key, ContentType="application/json",
                              Body=json.dumps(record, indent=2, sort_keys=True).encode())
    if ctx.settings.topic_arn:
        ctx.clients.sns.publish(TopicArn=ctx.settings.topic_arn, Message=reason,
                                Subject=f"[cxr] {run['dataset']}: run refused, daily cap reached"[:100])
    LOG.warning("run %s refused: %s", run["run_id"], reason)
    return {"status": "refused", "run_id": run["run_id"], "reason": reason,
            "record": f"s3://{ctx.settings.artifacts_bucket}/{key}"}


def run(event: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    state = initial_state(event, ctx.settings)
    if state is None:
        LOG.warning("ignoring an event that is not a datasets/<name>/_READY marker: %s",
                    json.dumps(event.get("detail", {}).get("object", {}))[:300])
        return {"status": "ignored"}
    rid = state["run"]["run_id"]
    sfn = ctx.clients.stepfunctions
    cap = ctx.settings.max_runs_per_day
    if cap:
        now = dt.datetime.now(dt.UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        started, names = runs_started_since(sfn, ctx.settings.state_machine_arn, midnight)
        if started >= cap and rid not in names:  # a repeated event for a started run is no new run
            return refuse(state, ctx, started, now)
    try:
        resp = sfn.start_execution(stateMachineArn=ctx.settings.state_machine_arn, name=rid,
                                   input=json.dumps(state, sort_keys=True))
    except sfn.exceptions.ExecutionAlreadyExists:
        LOG.info("run %s already exists for this marker version; nothing started", rid)
        return {"status": "duplicate", "run_id": rid}
    LOG.info("started run %s for dataset %s", rid, state["run"]["dataset"])
    return {"status": "started", "run_id": rid, "execution_arn": resp["executionArn"]}


handler = lambda_handler(run)
