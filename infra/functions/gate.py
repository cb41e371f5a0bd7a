"""The quality gate: approve a trained model on figures that did not choose it.

Reads what the Evaluate step (:mod:`infra.functions.evaluate`) measured and decides:

- **with an evaluation set** (the dataset's ``test/`` split or the fixed evaluation dataset):
  every metric named in ``gateThresholds`` must reach its minimum on that set; and when a model
  is in service (scored on the same images), the candidate must be **non-inferior** on
  ``gateCompareMetric``: the lower bound of the 95 % interval of (candidate - in service) above
  ``-gateNonInferiorityMargin``. With ``gateRequireImprovement`` it must also be significantly
  better: the whole interval above ``gateMinImprovement``.
- **without one**, only the thresholds on the candidate's own validation figures apply (and, with
  ``gateRequireImprovement``, beating the in-service model's validation ``gateCompareMetric``,
  though the two were measured on different splits); every reason, the registry entry and the
  notification say that the model was judged on its validation split only.

The judged figures are written next to the model as ``model-quality.json`` in SageMaker's
model-quality format, which the registry step links from the model package.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .common import LOG, StepContext, lambda_handler, parse_s3_uri, promoted_pointer  # noqa: F401 (re-exported)
from .evaluate import VALIDATION_ONLY

QUALITY_FILE = "model-quality.json"


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
            reasons.append(f"{name} is missing from the figures (required >= {minimum:g})")
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
    """SageMaker's model-quality statistics layout (binary classification), for the registry.

    ``standard_deviation`` is the bootstrap 95 % interval's half-width / 1.96 where the figure has
    an interval (a normal approximation of the bootstrap distribution), else "NaN"."""
    names = {"accuracy": "accuracy", "precision": "precision", "recall": "sensitivity",
             "true_positive_rate": "sensitivity", "true_negative_rate": "specificity", "f1": "f1", "auc": "roc_auc"}
    intervals = metrics.get("ci") or {}
    out = {}
    for sm_name, ours in names.items():
        value = _number(metrics.get(ours))
        if value is not None:
            lo, hi = (list(intervals.get(ours) or []) + [None, None])[:2]
            sd = (hi - lo) / (2 * 1.959964) if _number(lo) is not None and _number(hi) is not None else "NaN"
            out[sm_name] = {"value": value, "standard_deviation": sd}
    return {"version": 0.0, "binary_classification_metrics": out}


def _comparison_reasons(comparison: dict[str, Any], versus: str, margin: float, require_improvement: bool,
                        min_improvement: float) -> list[str]:
    from shared.evaluation import non_inferior, significantly_better

    metric, diff, (lo, hi) = comparison["metric"], comparison["difference"], comparison["ci"]
    shown = (f"{metric} {comparison['candidate']:.4f} vs {comparison['in_service']:.4f} for the model in service "
             f"({versus}) on the same {comparison['n']} images: difference {diff:+.4f}, 95% CI "
             + (f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else "not available"))
    if not non_inferior(_nan(comparison), margin):
        return [f"{shown}; the lower bound is not above the non-inferiority margin -{margin:g}"]
    if require_improvement and not significantly_better(_nan(comparison), min_improvement):
        return [f"{shown}; not significantly better (the lower bound must exceed {min_improvement:g})"]
    return []


def _nan(comparison: dict[str, Any]) -> dict[str, Any]:
    ci = [float("nan") if v is None else v for v in comparison["ci"]]
    return {**comparison, "ci": ci}


def decide(evaluation: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The gate's rule on the Evaluate step's output; ``settings`` is :meth:`Config.gate_settings`."""
    thresholds = {k: float(v) for k, v in (settings.get("thresholds") or {}).items()}
    metric = settings.get("compare_metric") or "roc_auc"
    margin = float(settings.get("non_inferiority_margin") or 0.0)
    min_improvement = float(settings.get("min_improvement") or 0.0)
    require = bool(settings.get("require_improvement"))
    in_service = evaluation.get("in_service") or None
    if evaluation.get("metrics"):
        metrics = {k: v for k, v in evaluation["metrics"].items() if k not in ("ci", "confusion_matrix")}
        reasons = [r + " on the evaluation set" for r in check_thresholds(metrics, thresholds)]
        if evaluation.get("comparison"):
            reasons += _comparison_reasons(evaluation["comparison"], in_service["model_version"], margin, require,
                                           min_improvement)
        evaluated = True
    else:
        metrics = dict(evaluation.get("validation_metrics") or {})
        reasons = [r + " (validation split)" for r in check_thresholds(metrics, thresholds)]
        if require and in_service and in_service.get("validation_metrics"):
            reasons += compare(metrics, in_service["validation_metrics"], metric, min_improvement,
                               in_service["model_version"])
        evaluated = False
    return {"approved": not reasons, "reasons": reasons, "metrics": metrics, "thresholds": thresholds,
            "compare_metric": metric, "evaluated": evaluated,
            "judged_on": evaluation.get("judged_on") or VALIDATION_ONLY}


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    evaluation = state["evaluation"]
    decision = decide(evaluation, ctx.settings.gate or {})
    model_uri = evaluation["model_uri"]
    bucket, key = parse_s3_uri(model_uri)
    quality_key = key.rsplit("/", 1)[0] + "/" + QUALITY_FILE
    report = model_quality_report(evaluation.get("metrics") or decision["metrics"])
    report["evaluated_on"] = decision["judged_on"]
    ctx.clients.s3.put_object(Bucket=bucket, Key=quality_key, ContentType="application/json",
                              Body=json.dumps(report, indent=2, sort_keys=True).encode())
    in_service = evaluation.get("in_service")
    LOG.info("gate for %s (judged on %s): %s %s", evaluation["model_version"], decision["judged_on"],
             "approved" if decision["approved"] else "rejected", decision["reasons"])
    return {
        **decision,
        "metrics": _numeric(decision["metrics"]),
        "in_service": ({"model_version": in_service["model_version"], "model_uri": in_service["model_uri"],
                        "metrics": _numeric({k: v for k, v in (in_service.get("metrics") or {}).items()})}
                       if in_service and not in_service.get("error") else None),
        "comparison": evaluation.get("comparison"),
        "model_uri": model_uri,
        "sha256": evaluation["sha256"],
        "model_version": evaluation["model_version"],
        "trained_at": evaluation.get("trained_at"),
        "metrics_uri": f"s3://{bucket}/{quality_key}",
        "skipped": evaluation.get("skipped", []),
        "skipped_count": evaluation.get("skipped_count", 0),
    }


handler = lambda_handler(run)
