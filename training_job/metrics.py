"""The decision threshold and the softmax temperature, both chosen on validation data; nothing here
looks at a test split. The metrics themselves are defined once, in :mod:`shared.evaluation`."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_curve

THRESHOLD_POLICIES = ("youden", "sensitivity", "balanced")


def threshold_for_policy(policy: str, y_true: np.ndarray, p_pos: np.ndarray, target_sensitivity: float = 0.0
                         ) -> tuple[float, str]:
    """(threshold, a sentence for the model card) of one of :data:`THRESHOLD_POLICIES` on validation.

    ``balanced`` is 0.5 on temperature-calibrated probabilities of a model trained with a
    class-balanced loss: the decision for equal class priors, which does not depend on the
    validation split's prevalence (74 % PNEUMONIA in the public train folder, 62.5 % in its test
    split). On a validation split the model separates almost perfectly, Youden's J is flat over a
    wide range of thresholds and a target sensitivity is decided by a few borderline images; see
    ``benchmarks/results/recipes.md`` for how each policy transferred to new patients.
    """
    if policy == "balanced":
        return 0.5, "0.5 on the calibrated probability (equal class priors)"
    if policy == "sensitivity":
        return (choose_threshold(y_true, p_pos, target_sensitivity),
                f"the highest threshold with validation sensitivity >= {target_sensitivity}")
    if policy == "youden":
        return choose_threshold(y_true, p_pos, 0.0), "maximising Youden's J on validation"
    raise ValueError(f"unknown threshold policy {policy!r}; choose one of {', '.join(THRESHOLD_POLICIES)}")


def choose_threshold(y_true: np.ndarray, p_pos: np.ndarray, target_sensitivity: float = 0.0) -> float:
    """The decision threshold, from validation data only.

    With ``target_sensitivity`` > 0: the highest threshold whose sensitivity reaches the target
    (the most specific operating point that still finds that share of pneumonia cases).

    Otherwise Youden's J (sensitivity + specificity - 1), made robust: a good model leaves a wide
    plateau of thresholds whose J is within one validation case of the best, and the plain
    arg-max sits at whichever edge a single borderline image decides. The threshold is the median
    of that plateau, so it does not hinge on one image.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    if target_sensitivity > 0:
        i = int(np.flatnonzero(tpr >= target_sensitivity)[0])
        t = float(thr[i])
        lower = p[p < t]
        t = (t + float(lower.max())) / 2.0 if lower.size else t
    else:
        j = tpr - fpr
        tol = max(1.0 / n_pos, 1.0 / n_neg) + 1e-12
        plateau = np.sort(thr[j >= j.max() - tol])
        t = float(np.median(plateau))
    return float(min(max(t, 1e-6), 1 - 1e-6))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation log loss of softmax(z/T).

    One scalar found by golden-section search over log T; it changes probabilities, not ranking.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(int)
    if len(set(y.tolist())) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        prob = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
        return float(log_loss(y, prob, labels=[0, 1]))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))
