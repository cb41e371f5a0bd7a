"""The Evaluate step: the candidate and the model in service, scored on the same images.

Validation figures chose the candidate's checkpoint, temperature and threshold, so they cannot
judge it; and two models' validation figures come from two different splits. This step scores
both models on one evaluation set with the serving code (:mod:`shared.scoring`: the Lambda's
decoding, preprocessing and ONNX Runtime predictor, each bundle at its own threshold) and
compares them image by image (:func:`shared.evaluation.paired_comparison`).

The evaluation set, first found wins:

1. the dataset's own ``test/`` split (``state["dataset"]["evaluation_set"]``), which training
   never reads;
2. the fixed evaluation dataset named by ``evaluationDatasetUri`` in cdk.json (an S3 prefix
   holding ``NORMAL/`` and ``PNEUMONIA/``, or a dataset root with ``test/``);
3. none: the step still checks the bundle and records its validation figures, and every message
   says the model was judged on its own validation split only (:data:`VALIDATION_ONLY`).

Written next to the model (``models/<job>/output/evaluation/``): ``predictions.csv`` (one row per
image: key, true label, each model's probability and label, or the error code of a refused file)
and ``evaluation.json`` (both models' figures with 95 % bootstrap intervals and the paired
comparison). It runs as a Lambda (10,240 MB, 6 vCPUs, 15 minutes) from the pipeline functions'
image, which carries the serving pins of ONNX Runtime; ``benchmarks/evaluate_benchmark.py``
measures its images per second per vCPU.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.bundle import Bundle, BundleError
from shared.dataset import DatasetLayoutError
from shared.labels import CLASS_NAMES

from .common import (
    LOG,
    BundleRejected,
    StepContext,
    StepError,
    lambda_handler,
    open_bundle,
    parse_s3_uri,
    promoted_pointer,
)
from .images import fetcher, labelled_images

VALIDATION_ONLY = "its own validation split only (no evaluation set: upload a test/ split or set evaluationDatasetUri)"
REPORT_FOLDER = "evaluation"
_LISTED_REFUSALS = 20  # the state document lists this many refused files; the CSV has them all


class EvaluationSetInvalid(StepError):
    """The evaluation set cannot be used (layout, or no readable image)."""


def evaluation_set(state: dict[str, Any], fixed_uri: str) -> dict[str, Any] | None:
    """Where the images come from: the dataset's test/ split, else the fixed set, else None."""
    own = (state.get("dataset") or {}).get("evaluation_set")
    if own:
        return dict(own)
    if fixed_uri:
        return {"source": "fixed", "uri": fixed_uri}
    return None


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite scalar figures of a metrics dict (what the state document and registry carry)."""
    out = {}
    for k, v in sorted(metrics.items()):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars plus their intervals, JSON-safe (NaN becomes None)."""
    def clean(v: float) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    out: dict[str, Any] = numeric(metrics)
    out["ci"] = {k: [clean(lo), clean(hi)] for k, (lo, hi) in metrics.get("ci", {}).items()}
    out["confusion_matrix"] = metrics.get("confusion_matrix")
    return out


def score_set(s3: Any, uri: str, predictors: list[Any]) -> tuple[list[Any], float]:
    """Every image of the evaluation set scored by each predictor; (rows, seconds)."""
    from shared.scoring import score

    try:
        bucket, items = labelled_images(s3, uri)
    except DatasetLayoutError as exc:
        raise EvaluationSetInvalid(str(exc)) from None
    labels = dict(items)
    started = time.perf_counter()
    rows = list(score(((key, labels[key], read) for key, read in fetcher(s3, bucket, [k for k, _ in items])),
                      predictors))
    return rows, time.perf_counter() - started


def predictions_csv(rows: list[Any], thresholds: list[float], names: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["key", "label"]
    for name in names:
        header += [f"probability_{name}", f"label_{name}"]
    w.writerow(header + ["error_code", "error"])
    for r in rows:
        line = [r.key, CLASS_NAMES[r.label] if r.label is not None else ""]
        for i, _ in enumerate(names):
            if r.ok:
                p = r.probabilities[i]
                line += [f"{p:.6f}", CLASS_NAMES[1] if p >= thresholds[i] else CLASS_NAMES[0]]
            else:
                line += ["", ""]
        w.writerow(line + [r.error_code or "", r.error or ""])
    return buf.getvalue().encode()


SKIPPED_LISTED = 50  # the run's state stays far below Step Functions' 256 KB payload limit


def skipped_files(bundle: Bundle) -> dict[str, Any]:
    """The images training skipped as unreadable (``provenance.dataset.skipped``), for the run record
    and the notification: ``skipped`` (the first :data:`SKIPPED_LISTED`, each ``{"file", "reason"}``)
    and ``skipped_count``."""
    skipped = ((bundle.meta.get("provenance") or {}).get("dataset") or {}).get("skipped") or []
    return {"skipped": [{"file": str(s.get("file")), "reason": str(s.get("reason"))[:200]}
                        for s in skipped[:SKIPPED_LISTED] if isinstance(s, dict)],
            "skipped_count": len(skipped)}


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    from shared.evaluation import metrics_with_ci, paired_comparison
    from shared.predictor import OnnxPredictor

    gate_settings = ctx.settings.gate or {}
    metric = gate_settings.get("compare_metric") or "roc_auc"
    model_uri = state["training"]["model_uri"]
    s3 = ctx.clients.s3
    bucket, key = parse_s3_uri(model_uri)
    folder = key.rsplit("/", 1)[0] + f"/{REPORT_FOLDER}/"

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        try:
            candidate, sha = open_bundle(s3, model_uri, Path(tmp) / "candidate")
        except BundleError as exc:
            raise BundleRejected(f"the training job's model at {model_uri} is not a valid bundle: {exc}") from None
        out: dict[str, Any] = {
            "model_uri": model_uri, "sha256": sha, "model_version": candidate.version,
            "trained_at": candidate.trained_at, "validation_metrics": numeric(candidate.validation_metrics),
            "threshold": candidate.threshold, "in_service": None, "evaluation_set": None, "metrics": None,
            "comparison": None, "judged_on": VALIDATION_ONLY, **skipped_files(candidate),
        }
        champion = None
        pointer = promoted_pointer(ctx.clients.ssm, ctx.settings.pointer_parameter)
        if pointer is not None and pointer.sha256 != sha:
            try:
                champion, champion_sha = open_bundle(s3, pointer.model_uri, Path(tmp) / "in-service")
                if champion_sha != pointer.sha256:
                    raise BundleError("its archive's SHA-256 differs from the pointer's")
            except (BundleError, OSError, s3.exceptions.ClientError) as exc:
                LOG.warning("the model in service (%s) cannot be read, so it cannot be compared: %s",
                            pointer.model_version, exc)
                out["in_service"] = {"model_version": pointer.model_version, "model_uri": pointer.model_uri,
                                     "error": f"cannot be read: {exc}"}
                champion = None
            else:
                out["in_service"] = {"model_version": champion.version, "model_uri": pointer.model_uri,
                                     "threshold": champion.threshold,
                                     "validation_metrics": numeric(champion.validation_metrics)}

        where = evaluation_set(state, ctx.settings.evaluation_dataset)
        if where is None:
            LOG.info("no evaluation set for %s: judged on its validation split only", candidate.version)
            return out

        models = [candidate] + ([champion] if champion is not None else [])
        rows, seconds = score_set(s3, where["uri"], [OnnxPredictor(b) for b in models])
        scored = [r for r in rows if r.ok]
        refused = [r for r in rows if not r.ok]
        if not scored:
            raise EvaluationSetInvalid(f"none of the {len(rows)} files of the evaluation set {where['uri']} could be "
                                       f"scored (first: {refused[0].key}: {refused[0].error})")
        y = np.asarray([r.label for r in scored])
        probs = np.asarray([r.probabilities for r in scored])  # N x models
        report: dict[str, Any] = {"evaluation_set": where, "n": len(scored), "refused": len(refused)}
        cand_metrics = metrics_with_ci(y, probs[:, 0], candidate.threshold)
        report["candidate"] = {"model_version": candidate.version, **_figures(cand_metrics)}
        if champion is not None:
            champ_metrics = metrics_with_ci(y, probs[:, 1], champion.threshold)
            report["in_service"] = {"model_version": champion.version, **_figures(champ_metrics)}
            report["comparison"] = paired_comparison(y, probs[:, 0], probs[:, 1], candidate.threshold,
                                                     champion.threshold, metric)
        names = ["candidate"] + (["in_service"] if champion is not None else [])
        csv_key, json_key = folder + "predictions.csv", folder + "evaluation.json"
        s3.put_object(Bucket=bucket, Key=csv_key, ContentType="text/csv",
                      Body=predictions_csv(rows, [b.threshold for b in models], names))
        s3.put_object(Bucket=bucket, Key=json_key, ContentType="application/json",
                      Body=json.dumps(report, indent=2, sort_keys=True, default=_json_default).encode())

    n = len(rows)
    LOG.info("evaluated %s on %d images (%d refused) in %.1f s", candidate.version, n, len(refused), seconds)
    out.update({
        "evaluation_set": {**where, "n": len(scored), "refused": len(refused),
                           "refused_files": [f"{r.key}: {r.error_code}" for r in refused[:_LISTED_REFUSALS]]},
        "metrics": report["candidate"],
        "comparison": report.get("comparison"),
        "judged_on": f"the evaluation set {where['uri']} ({len(scored)} images"
                     + (", the dataset's test/ split" if where.get("source") == "dataset" else ", the fixed evaluation set")
                     + ")",
        "predictions_uri": f"s3://{bucket}/{csv_key}",
        "report_uri": f"s3://{bucket}/{json_key}",
        "images_per_second": round(n * len(models) / seconds, 1) if seconds > 0 else None,
    })
    if champion is not None:
        out["in_service"]["metrics"] = report["in_service"]
    return _json_safe(out)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None: the state document is JSON, which has neither."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


handler = lambda_handler(run)
