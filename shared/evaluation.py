"""Figures of a model on a labelled evaluation set, with 95 % bootstrap confidence intervals.

One definition for every place that judges a model: the recipe benchmark, the evaluation command,
the pipeline's Evaluate step and the model card. The positive class is PNEUMONIA (index 1); a case
is called positive when its probability is at or above the threshold.

Needs scikit-learn and SciPy (the ``train`` and ``evaluate`` extras); the inference Lambda never
imports this module.

Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13) from
``scipy.stats.bootstrap`` with images resampled as (label, probability) pairs, a fixed seed and
2,000 resamples by default, so a figure reproduces exactly. On 311 images an AUC interval is about
±0.01 wide and an accuracy interval about ±0.03.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

CI_LEVEL = 0.95
N_BOOTSTRAP = 2000
SPECIFICITY_FOR_SENSITIVITY = 0.90  # the operating point reported as "sensitivity at specificity 0.90"

# The figures that get an interval, in report order.
CI_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "sens_at_spec90")


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def sensitivity_at_specificity(y_true: np.ndarray, p_pos: np.ndarray, specificity: float = 0.90) -> float:
    """The highest sensitivity of any threshold whose specificity is at least ``specificity``.

    ``y_true``: N ints in {0, 1}; ``p_pos``: N probabilities of the positive class. Returns a value
    in [0, 1], or NaN when only one class is present.
    """
    y = np.asarray(y_true).astype(int)
    if len(set(y.tolist())) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, np.asarray(p_pos, dtype=np.float64))
    ok = tpr[fpr <= 1 - specificity + 1e-12]
    return float(ok.max()) if ok.size else 0.0


def metrics_at_threshold(y_true: np.ndarray, p_pos: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, precision, F1, ROC AUC, sensitivity at specificity 0.90
    and the confusion matrix of N cases.

    ``y_true``: N ints in {0, 1} (1 = PNEUMONIA); ``p_pos``: N floats in [0, 1]; ``threshold`` in
    [0, 1]. Ratios with an empty denominator (and AUC with one class) are NaN.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    n = tn + fp + fn + tp
    sens, prec = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    two_classes = len(set(y.tolist())) == 2
    return {
        "n": n,
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "precision": prec,
        "f1": float(2 * prec * sens / (prec + sens)) if (prec + sens) and not math.isnan(prec + sens) else float("nan"),
        "roc_auc": float(roc_auc_score(y, p)) if two_classes else float("nan"),
        "sens_at_spec90": sensitivity_at_specificity(y, p, SPECIFICITY_FOR_SENSITIVITY),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "positives": int(y.sum()),
        "negatives": int(n - y.sum()),
    }


def _statistic(name: str, threshold: float):
    def accuracy(y, p):
        return float(np.mean((p >= threshold) == (y == 1)))

    def sensitivity(y, p):
        pos = y == 1
        return float(np.mean(p[pos] >= threshold)) if pos.any() else float("nan")

    def specificity(y, p):
        neg = y == 0
        return float(np.mean(p[neg] < threshold)) if neg.any() else float("nan")

    def roc_auc(y, p):
        return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")

    def sens_at_spec90(y, p):
        return sensitivity_at_specificity(y, p, SPECIFICITY_FOR_SENSITIVITY)

    return {"accuracy": accuracy, "sensitivity": sensitivity, "specificity": specificity, "roc_auc": roc_auc,
            "sens_at_spec90": sens_at_spec90}[name]


def confidence_interval(y_true: np.ndarray, p_pos: np.ndarray, metric: str, threshold: float = 0.5,
                        n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of one of :data:`CI_METRICS` over N (label, probability)
    pairs; ``(nan, nan)`` when fewer than two images or one class only."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    if len(y) < 2 or len(set(y.tolist())) < 2:
        return float("nan"), float("nan")
    stat = _statistic(metric, threshold)
    res = bootstrap((y, p), stat, paired=True, vectorized=False, n_resamples=n_resamples,
                    confidence_level=CI_LEVEL, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def metrics_with_ci(y_true: np.ndarray, p_pos: np.ndarray, threshold: float, n_resamples: int = N_BOOTSTRAP,
                    seed: int = 0) -> dict[str, Any]:
    """:func:`metrics_at_threshold` plus ``"ci"``: ``{metric: [low, high]}`` for each of
    :data:`CI_METRICS` (95 %, percentile bootstrap, seeded: the same inputs give the same interval)."""
    out = metrics_at_threshold(y_true, p_pos, threshold)
    out["ci"] = {m: list(confidence_interval(y_true, p_pos, m, threshold, n_resamples, seed)) for m in CI_METRICS}
    out["ci_method"] = f"{CI_LEVEL:.0%} percentile bootstrap, {n_resamples} resamples, seed {seed}"
    return out


def format_with_ci(metrics: dict[str, Any], name: str, digits: int = 3) -> str:
    """``0.953 [0.931, 0.972]``: a figure and its interval from :func:`metrics_with_ci`'s output."""
    value = metrics.get(name, float("nan"))
    lo, hi = metrics.get("ci", {}).get(name, (float("nan"), float("nan")))
    if lo is None or hi is None or math.isnan(lo):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
