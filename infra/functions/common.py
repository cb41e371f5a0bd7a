"""What every pipeline function shares: settings, AWS clients, the run identity, error shapes.

Each step is a plain function ``run(state, ctx) -> dict``: ``state`` is the workflow's state
document (what Step Functions passes as the Lambda payload), ``ctx`` a :class:`StepContext` with
settings and boto3 clients. The Lambda handler builds the context from environment variables;
tests and the local twin build it by hand with their own clients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.bundle import ARCHIVE_NAME, Bundle, file_sha256, read_bundle
from shared.dataset import MARKER_NAME
from shared.pointer import ModelPointer, PointerError

LOG = logging.getLogger("cxr.pipeline")

# Where things live in the two buckets (contract 1 for datasets). The SageMaker role writes only
# under MODELS_PREFIX and CHECKPOINTS_PREFIX; serving reads only under MODELS_PREFIX.
DATASETS_PREFIX = "datasets/"
MODELS_PREFIX = "models/"
CHECKPOINTS_PREFIX = "checkpoints/"
# Markers the starter refused (the daily cap), one JSON record each, in the artifacts bucket.
REFUSED_RUNS_PREFIX = "runs/refused/"
APPROVAL_TAG = "cxr-approval"
RUN_ID_PREFIX = "cxr-"
# The pointer's value before the first promotion: not a valid ModelPointer on purpose, so serving
# answers 503 "no model promoted yet" and the gate has nothing to compare with.
UNPROMOTED = json.dumps({"status": "no model has been promoted yet"})
_MAX_SLUG = 40


class StepError(Exception):
    """A step could not do its work; the message is shown to the user in the notification."""


class DatasetInvalid(StepError):
    """The uploaded dataset cannot be trained on (layout, manifest or marker problem)."""


class BundleRejected(StepError):
    """The training job produced no readable model bundle."""


@dataclass
class Settings:
    """Resource names a step needs; in Lambda they come from environment variables."""

    data_bucket: str = ""
    artifacts_bucket: str = ""
    pointer_parameter: str = ""
    topic_arn: str = ""
    model_package_group: str = ""
    state_machine_arn: str = ""
    gate: dict[str, Any] = field(default_factory=dict)
    max_runs_per_day: int = 0  # 0: no cap
    evaluation_dataset: str = ""  # s3:// prefix of the fixed evaluation set (cdk.json evaluationDatasetUri)
    serving_image_uri: str = ""  # the inference image the model package's inference specification names

    _ENV = {
        "data_bucket": "DATA_BUCKET",
        "artifacts_bucket": "ARTIFACTS_BUCKET",
        "pointer_parameter": "POINTER_PARAMETER",
        "topic_arn": "TOPIC_ARN",
        "model_package_group": "MODEL_PACKAGE_GROUP",
        "state_machine_arn": "STATE_MACHINE_ARN",
        "gate": "GATE_CONFIG",
        "max_runs_per_day": "MAX_RUNS_PER_DAY",
        "evaluation_dataset": "EVALUATION_DATASET_URI",
        "serving_image_uri": "SERVING_IMAGE_URI",
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = cls._ENV.get(f.name)
            if var and env.get(var):
                values[f.name] = json.loads(env[var]) if f.name in ("gate", "max_runs_per_day") else env[var]
        return cls(**values)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        return dict(cls._ENV)


class Clients:
    """boto3 clients by service name, created on first use unless given."""

    def __init__(self, **given: Any) -> None:
        self._clients = dict(given)

    def __getattr__(self, service: str) -> Any:
        if service.startswith("_"):
            raise AttributeError(service)
        if service not in self._clients:
            import boto3

            self._clients[service] = boto3.client(service.replace("_", "-"))
        return self._clients[service]


@dataclass
class StepContext:
    settings: Settings
    clients: Clients

    @classmethod
    def from_env(cls) -> StepContext:
        return cls(Settings.from_env(), Clients())


def lambda_handler(run: Callable[[dict, StepContext], dict]) -> Callable[[dict, Any], dict]:
    """Wrap ``run`` as a Lambda handler that builds its context once per container."""
    ctx_holder: list[StepContext] = []

    def handler(event: dict, _context: Any = None) -> dict:
        if not ctx_holder:
            # Lambda's root logger starts at WARNING; step logs are INFO.
            logging.getLogger().setLevel(os.environ.get("LOG_LEVEL", "INFO"))
            ctx_holder.append(StepContext.from_env())
        return run(event, ctx_holder[0])

    handler.__name__ = "handler"
    handler.__doc__ = f"Lambda entry point for {run.__module__}.{run.__name__}."
    return handler


# ------------------------------------------------------------------ run identity


def slug(text: str, limit: int = _MAX_SLUG) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].strip("-") or "dataset"


def run_id(dataset: str, marker_version: str) -> str:
    """One name per marker object version: the execution name and the training job name.

    ``cxr-<dataset slug>-<12 hex of the version>``: at most 57 characters, so it fits the 80 of a
    Step Functions execution and the 63 (letters, digits, dashes) of a SageMaker job.
    """
    if not marker_version:
        raise ValueError("the marker's version id or ETag is needed to name the run")
    digest = hashlib.sha256(marker_version.encode("utf-8")).hexdigest()[:12]
    return f"{RUN_ID_PREFIX}{slug(dataset)}-{digest}"


def marker_version(version_id: str | None, etag: str | None) -> str:
    """The marker's identity: its S3 version id (versioned bucket) or else its ETag."""
    if version_id and version_id != "null":
        return f"v:{version_id}"
    if etag:
        return f"e:{etag.strip(chr(34))}"
    return ""


def dataset_name_from_key(key: str) -> str | None:
    """``datasets/<name>/_READY`` -> ``<name>``; None for any other key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == DATASETS_PREFIX and parts[1] and parts[2] == MARKER_NAME:
        return parts[1]
    return None


# ------------------------------------------------------------------ S3 and errors


def parse_s3_uri(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc or not u.path.lstrip("/"):
        raise StepError(f"{uri!r} is not an s3://bucket/key URI")
    return u.netloc, u.path.lstrip("/")


def download(s3: Any, uri: str, dest: Path) -> str:
    """Download ``uri`` to ``dest``; returns the file's SHA-256 (hex)."""
    bucket, key = parse_s3_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    s3.download_file(bucket, key, str(dest))
    return file_sha256(dest)


def open_bundle(s3: Any, uri: str, workdir: Path) -> tuple[Bundle, str]:
    """The bundle at ``uri`` (a model.tar.gz), unpacked under ``workdir``, and the archive's SHA-256.

    Raises :class:`shared.bundle.BundleError` when the archive is not a valid bundle."""
    sha = download(s3, uri, workdir / ARCHIVE_NAME)
    return read_bundle(workdir / ARCHIVE_NAME, unpack_to=workdir / "bundle"), sha


def promoted_pointer(ssm: Any, name: str) -> ModelPointer | None:
    """The promoted model's pointer, or None when nothing valid has been promoted yet."""
    if not name:
        return None
    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    try:
        return ModelPointer.from_json(value)
    except PointerError:
        return None


def error_output(exc: BaseException) -> dict[str, str]:
    """The shape Step Functions puts in ``$.error`` when a Lambda task raises ``exc``."""
    return {"Error": type(exc).__name__,
            "Cause": json.dumps({"errorMessage": str(exc), "errorType": type(exc).__name__})}


def failure_reason(error: dict[str, Any] | None) -> str:
    """A readable sentence from a ``$.error`` object (Lambda error or SageMaker job failure)."""
    if not error:
        return "unknown error"
    cause = error.get("Cause") or ""
    try:
        doc = json.loads(cause) if cause else {}
    except (TypeError, json.JSONDecodeError):
        doc = {}
    if isinstance(doc, dict):
        if doc.get("FailureReason") or doc.get("TrainingJobStatus"):
            status = doc.get("TrainingJobStatus", "Failed")
            return (f"training job {doc.get('TrainingJobName', '')} {status.lower()}: "
                    f"{doc.get('FailureReason') or doc.get('SecondaryStatus') or 'no reason given'}").replace("  ", " ")
        if doc.get("errorMessage"):
            return f"{doc.get('errorType') or error.get('Error')}: {doc['errorMessage']}"
    text = cause if isinstance(cause, str) else json.dumps(cause)
    return f"{error.get('Error', 'Error')}: {text[:500]}" if text else str(error.get("Error", "unknown error"))
