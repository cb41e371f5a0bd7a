"""Figures of a model on a labelled evaluation set, with 95 % bootstrap confidence intervals.

One definition for every place that judges a model: the recipe benchmark, the evaluation command,
the pipeline's Evaluate step and the model card. The positive class is PNEUMONIA (index 1); a case
is called positive when its probability is at or above the threshold.

Needs scikit-learn and SciPy (the ``train`` and ``evaluate`` extras), imported where they are
used: the metric names alone (:data:`METRIC_NAMES`, read by ``infra.config`` at synth time) need
neither. The inference Lambda never imports this module.

Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13) from
``scipy.stats.bootstrap`` with images resampled as (label, probability) pairs, a fixed seed and
2,000 resamples by default, so a figure reproduces exactly. On 311 images an AUC interval is about
±0.02 wide and an accuracy interval about ±0.03.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CI_LEVEL = 0.95
N_BOOTSTRAP = 2000
SPECIFICITY_FOR_SENSITIVITY = 0.90  # the operating point reported as "sensitivity at specificity 0.90"

# The figures that get an interval, in report order.
CI_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "sens_at_spec90")
# Every figure :func:`metrics_at_threshold` reports that a gate threshold may name.
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "sens_at_spec90")


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def sensitivity_at_specificity(y_true: np.ndarray, p_pos: np.ndarray, specificity: float = 0.90) -> float:
    """The highest sensitivity of any threshold whose specificity is at least ``specificity``.

    ``y_true``: N ints in {0, 1}; ``p_pos``: N probabilities of the positive class. Returns a value
    in [0, 1], or NaN when only one class is present.
    """
    from sklearn.metrics import roc_curve

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
    from sklearn.metrics import confusion_matrix, roc_auc_score

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


def _auc(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC along ``axis`` as the Mann-Whitney U statistic over average ranks (equal to
    ``sklearn.metrics.roc_auc_score``, ties counted one half; Hanley & McNeil 1982); NaN where a
    row has one class only. Vectorised so that a bootstrap evaluates thousands of resamples at once."""
    from scipy.stats import rankdata

    y = np.moveaxis(np.asarray(y), axis, -1) == 1
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, -1)
    y, p = np.broadcast_arrays(y, p)
    ranks = rankdata(p, axis=-1)
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2.0
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _statistic(name: str, threshold: float):
    """``stat(y, p, axis=-1)`` for :func:`scipy.stats.bootstrap` (vectorised), and whether it is."""

    def accuracy(y, p, axis=-1):
        return np.mean((p >= threshold) == (y == 1), axis=axis)

    def sensitivity(y, p, axis=-1):
        pos = y == 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum((p >= threshold) & pos, axis=axis) / np.sum(pos & np.ones_like(p, dtype=bool), axis=axis)

    def specificity(y, p, axis=-1):
        neg = y == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum((p < threshold) & neg, axis=axis) / np.sum(neg & np.ones_like(p, dtype=bool), axis=axis)

    def roc_auc(y, p, axis=-1):
        return _auc(y, p, axis)

    def sens_at_spec90(y, p):
        return sensitivity_at_specificity(y, p, SPECIFICITY_FOR_SENSITIVITY)

    table = {"accuracy": accuracy, "sensitivity": sensitivity, "specificity": specificity, "roc_auc": roc_auc}
    if name in table:
        return table[name], True
    return {"sens_at_spec90": sens_at_spec90}[name], False


def confidence_interval(y_true: np.ndarray, p_pos: np.ndarray, metric: str, threshold: float = 0.5,
                        n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of one of :data:`CI_METRICS` over N (label, probability)
    pairs; ``(nan, nan)`` when fewer than two images or one class only."""
    from scipy.stats import bootstrap

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    if len(y) < 2 or len(set(y.tolist())) < 2:
        return float("nan"), float("nan")
    stat, vectorized = _statistic(metric, threshold)
    res = bootstrap((y, p), stat, paired=True, vectorized=vectorized, n_resamples=n_resamples,
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
    """``0.953 [0.931, 0.972]``: a figure and its interval from :func:`metrics_with_ci`'s output;
    ``n/a`` for a figure the data cannot give (sensitivity without PNEUMONIA images, say)."""
    value = metrics.get(name)
    if value is None or math.isnan(value):
        return "n/a"
    lo, hi = metrics.get("ci", {}).get(name, (float("nan"), float("nan")))
    if lo is None or hi is None or math.isnan(lo):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ------------------------------------------------------------------ champion vs challenger

PAIRED_METRICS = CI_METRICS  # what the paired comparison can be asked about


def paired_comparison(y_true: np.ndarray, p_candidate: np.ndarray, p_in_service: np.ndarray,
                      threshold_candidate: float, threshold_in_service: float, metric: str = "roc_auc",
                      n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """The candidate against the model in service on the same N images (each at its own threshold).

    ``y_true``: N ints in {0, 1}; ``p_candidate``, ``p_in_service``: N probabilities of PNEUMONIA
    for the same images in the same order. Returns::

        {"metric", "candidate", "in_service", "difference" (candidate - in service),
         "ci": [low, high]        # 95 % paired percentile bootstrap of the difference
         "p_value",               # two-sided, from the paired bootstrap of the difference
         "mcnemar": {"candidate_only_correct", "in_service_only_correct", "p_value"},
         "method"}

    - Difference CI: ``scipy.stats.bootstrap`` resampling images as (label, p_candidate,
      p_in_service) triples, so both models see the same resample (the paired bootstrap of
      Efron & Tibshirani 1993, ch. 13; for ROC AUC an alternative to DeLong et al. 1988).
    - p-value: two-sided, from the same paired bootstrap distribution of the difference (twice
      the smaller share of resampled differences at or beyond 0), so it agrees with the interval.
    - McNemar's exact test on the images the two models label differently (McNemar 1947): under
      H0 each discordant image is equally likely to favour either model, so the count is
      Binomial(n_discordant, 1/2), tested with ``scipy.stats.binomtest`` (what statsmodels'
      ``mcnemar(exact=True)`` computes).

    Raises ``ValueError`` for an unknown ``metric`` or arrays of different lengths. With fewer than
    two images or one class only, the interval and p-value are NaN.
    """
    from scipy.stats import binomtest, bootstrap

    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(PAIRED_METRICS)}")
    y = np.asarray(y_true).astype(int)
    pa = np.asarray(p_candidate, dtype=np.float64)
    pb = np.asarray(p_in_service, dtype=np.float64)
    if not len(y) == len(pa) == len(pb):
        raise ValueError(f"{len(y)} labels, {len(pa)} candidate and {len(pb)} in-service probabilities")
    (stat_a, vectorized), (stat_b, _) = _statistic(metric, threshold_candidate), _statistic(metric, threshold_in_service)
    a, b = float(stat_a(y, pa)), float(stat_b(y, pb))
    out: dict[str, Any] = {"metric": metric, "n": int(len(y)), "candidate": a, "in_service": b,
                           "difference": a - b, "ci": [float("nan"), float("nan")], "p_value": float("nan")}
    if len(y) >= 2 and len(set(y.tolist())) == 2:
        def diff(yy, xa, xb, **axis):
            return stat_a(yy, xa, **axis) - stat_b(yy, xb, **axis)

        res = bootstrap((y, pa, pb), diff, paired=True, vectorized=vectorized, n_resamples=n_resamples,
                        confidence_level=CI_LEVEL, method="percentile", rng=np.random.default_rng(seed))
        out["ci"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
        # Two-sided p-value from the same paired bootstrap: twice the smaller share of resampled
        # differences on either side of 0 (the test the interval inverts; Efron & Tibshirani 1993,
        # ch. 16). A permutation test that swaps the two models' scores within an image is not
        # used: two models' probabilities live on different scales, so swapping them breaks the
        # ranking of both and makes the null far too wide.
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        dist = dist[np.isfinite(dist)]
        if dist.size:  # never 0 from a finite sample: at least 1 / (resamples + 1)
            tail = min(np.mean(dist <= 0), np.mean(dist >= 0))
            out["p_value"] = float(min(1.0, max(2 * tail, 1.0 / (dist.size + 1))))
    correct_a = (pa >= threshold_candidate) == (y == 1)
    correct_b = (pb >= threshold_in_service) == (y == 1)
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(correct_b & ~correct_a))
    out["mcnemar"] = {"candidate_only_correct": only_a, "in_service_only_correct": only_b,
                      "p_value": float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0}
    out["method"] = (f"difference: {CI_LEVEL:.0%} paired percentile bootstrap, {n_resamples} resamples, seed {seed}; "
                     "p: two-sided, from the same bootstrap; labels: exact McNemar test")
    return out


def non_inferior(comparison: dict[str, Any], margin: float) -> bool:
    """True when the lower bound of the difference's 95 % interval is above ``-margin`` (the
    confidence-interval rule for non-inferiority, CONSORT extension, Piaggio et al. JAMA 2012)."""
    low = comparison["ci"][0]
    return low is not None and not math.isnan(low) and low > -abs(margin)


def significantly_better(comparison: dict[str, Any], min_improvement: float = 0.0) -> bool:
    """True when the whole 95 % interval of the difference lies above ``min_improvement``."""
    low = comparison["ci"][0]
    return low is not None and not math.isnan(low) and low > min_improvement
