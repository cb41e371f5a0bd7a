"""The quality gate: approve a trained model only when its validation metrics are good enough.

Reads ``bundle.json`` from the job's ``model.tar.gz`` (through :func:`shared.bundle.read_bundle`,
which also checks the ONNX file against its recorded checksum), compares each metric named in
the ``gateThresholds`` context value with its minimum and, with ``gateRequireImprovement``, also
requires ``gateCompareMetric`` to be at least the promoted model's plus ``gateMinImprovement``.
The promoted model is the one the pointer names (:mod:`shared.pointer`); with none promoted yet
(or one that can no longer be read) only the thresholds apply.

Either way the metrics are written next to the model as ``model-quality.json`` in SageMaker's
model-quality format, which the registry step links from the model package.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from shared.bundle import ARCHIVE_NAME, Bundle, BundleError, read_bundle
from shared.pointer import ModelPointer, PointerError

from .common import LOG, BundleRejected, StepContext, lambda_handler, parse_s3_uri

QUALITY_FILE = "model-quality.json"


def _download(s3: Any, uri: str, dest: Path) -> str:
    bucket, key = parse_s3_uri(uri)
    s3.download_file(bucket, key, str(dest))
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_bundle(s3: Any, uri: str, workdir: Path) -> tuple[Bundle, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / ARCHIVE_NAME
    sha = _download(s3, uri, archive)
    return read_bundle(archive, unpack_to=workdir / "bundle"), sha


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


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (what the state document and the registry carry)."""
    return {k: float(v) for k, v in sorted(metrics.items()) if not isinstance(v, bool) and _number(v) is not None}


def check_thresholds(metrics: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    reasons = []
    for name, minimum in sorted(thresholds.items()):
        value = _number(metrics.get(name))
        if value is None:
            reasons.append(f"{name} is missing from the validation metrics (required >= {minimum:g})")
        elif value < float(minimum):
            reasons.append(f"{name} {value:.4f} is below the required {float(minimum):.4f}")
    return reasons


def compare(candidate: dict[str, Any], in_service: dict[str, Any], metric: str, margin: float,
            in_service_version: str) -> list[str]:
    new, old = _number(candidate.get(metric)), _number(in_service.get(metric))
    if old is None:
        return []
    if new is None:
        return [f"{metric} is missing, so the model cannot be compared with the one in service ({in_service_version})"]
    if new < old + margin:
        need = f"{old:.4f}" + (f" + {margin:g}" if margin else "")
        return [f"{metric} {new:.4f} does not beat the model in service ({in_service_version}: {need})"]
    return []


def model_quality_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """SageMaker's model-quality statistics layout (binary classification), for the registry."""
    names = {"accuracy": "accuracy", "precision": "precision", "recall": "sensitivity",
             "true_positive_rate": "sensitivity", "true_negative_rate": "specificity", "f1": "f1", "auc": "roc_auc"}
    out = {}
    for sm_name, ours in names.items():
        value = _number(metrics.get(ours))
        if value is not None:
            out[sm_name] = {"value": value, "standard_deviation": "NaN"}
    return {"version": 0.0, "binary_classification_metrics": out}


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    settings = ctx.settings.gate or {}
    thresholds = {k: float(v) for k, v in (settings.get("thresholds") or {}).items()}
    metric = settings.get("compare_metric") or "roc_auc"
    margin = float(settings.get("min_improvement") or 0.0)
    model_uri = state["training"]["model_uri"]
    s3, ssm = ctx.clients.s3, ctx.clients.ssm

    with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
        try:
            bundle, sha = _open_bundle(s3, model_uri, Path(tmp) / "candidate")
        except BundleError as exc:
            raise BundleRejected(f"the training job's model at {model_uri} is not a valid bundle: {exc}") from None
        metrics = bundle.validation_metrics
        reasons = check_thresholds(metrics, thresholds)

        in_service = None
        pointer = promoted_pointer(ssm, ctx.settings.pointer_parameter)
        if settings.get("require_improvement") and pointer is not None and pointer.model_uri != model_uri:
            try:
                current, _ = _open_bundle(s3, pointer.model_uri, Path(tmp) / "current")
            except (BundleError, OSError, s3.exceptions.ClientError) as exc:
                LOG.warning("the model in service (%s) cannot be read, so only thresholds apply: %s",
                            pointer.model_version, exc)
            else:
                in_service = {"model_version": pointer.model_version, "model_uri": pointer.model_uri,
                              "metrics": _numeric(current.validation_metrics)}
                reasons += compare(metrics, current.validation_metrics, metric, margin, pointer.model_version)

    bucket, key = parse_s3_uri(model_uri)
    quality_key = key.rsplit("/", 1)[0] + "/" + QUALITY_FILE
    s3.put_object(Bucket=bucket, Key=quality_key, ContentType="application/json",
                  Body=json.dumps(model_quality_report(metrics), indent=2, sort_keys=True).encode())
    approved = not reasons
    LOG.info("gate for %s: %s %s", bundle.version, "approved" if approved else "rejected", reasons)
    return {
        "approved": approved,
        "reasons": reasons,
        "metrics": _numeric(metrics),
        "thresholds": thresholds,
        "compare_metric": metric,
        "in_service": in_service,
        "model_uri": model_uri,
        "sha256": sha,
        "model_version": bundle.version,
        "trained_at": bundle.trained_at,
        "metrics_uri": f"s3://{bucket}/{quality_key}",
        **skipped_files(bundle),
    }


SKIPPED_LISTED = 50  # the run's state stays far below Step Functions' 256 KB payload limit


def skipped_files(bundle: Bundle) -> dict[str, Any]:
    """The images training skipped as unreadable (``provenance.dataset.skipped``), for the run record
    and the notification: ``skipped`` (the first :data:`SKIPPED_LISTED`, each ``{"file", "reason"}``)
    and ``skipped_count``."""
    skipped = ((bundle.meta.get("provenance") or {}).get("dataset") or {}).get("skipped") or []
    return {"skipped": [{"file": str(s.get("file")), "reason": str(s.get("reason"))[:200]}
                        for s in skipped[:SKIPPED_LISTED] if isinstance(s, dict)],
            "skipped_count": len(skipped)}


handler = lambda_handler(run)
