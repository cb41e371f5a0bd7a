"""The bundle's ``report/``: metrics.json, ROC curve, confusion matrix, learning curves and a
short model card. Plots are matplotlib (Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from shared.evaluation import CI_METRICS, format_with_ci  # noqa: E402
from shared.labels import CLASS_NAMES  # noqa: E402

DATA_CREDIT = (
    "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases by "
    "Image-Based Deep Learning. Cell 172(5):1122-1131.e9, 2018. doi:10.1016/j.cell.2018.02.010. "
    "Data: Kermany D, Zhang K, Goldbaum M, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, licensed CC BY 4.0."
)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def write_report(out: Path, *, metrics: dict, y_val: np.ndarray, p_val: np.ndarray, history: list[dict],
                 summary: dict) -> Path:
    """Write ``metrics.json``, ``roc.png``, ``confusion_matrix.png``, ``reliability.png``,
    ``learning_curves.png`` and ``MODEL_CARD.md`` into ``out``.

    ``metrics["validation"]`` is :func:`shared.evaluation.metrics_with_ci`'s output at the bundle's
    threshold; any other entry of that form (e.g. ``"test"``) is shown beside it in the model card.
    ``y_val``: N labels in {0, 1}; ``p_val``: N calibrated probabilities of PNEUMONIA.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    neg, pos = CLASS_NAMES[0], CLASS_NAMES[1]

    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=100)
    RocCurveDisplay.from_predictions(y_val, p_val, ax=ax, name="validation", pos_label=1)
    thr = metrics["validation"]
    ax.plot(1 - thr["specificity"], thr["sensitivity"], "o", color="crimson",
            label=f"threshold {thr['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel(f"1 - specificity ({neg} called {pos})")
    ax.set_ylabel(f"sensitivity ({pos} found)")
    ax.set_title("ROC, validation split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)

    cm = thr["confusion_matrix"]
    matrix = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    ConfusionMatrixDisplay(matrix, display_labels=list(CLASS_NAMES)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Validation, threshold {thr['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=100)
    CalibrationDisplay.from_predictions(y_val, p_val, n_bins=10, strategy="quantile", ax=ax, name="validation")
    ax.set_xlabel(f"predicted probability of {pos} (mean per bin)")
    ax.set_ylabel(f"observed share of {pos} (per bin)")
    ax.set_title("Reliability, validation split (10 quantile bins)")
    fig.tight_layout()
    fig.savefig(out / "reliability.png")
    plt.close(fig)

    best = summary.get("best_epoch")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=100)
    epochs = [h["epoch"] for h in history]
    a1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a1.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a1.set_ylabel("cross-entropy loss")
    a2.plot(epochs, [h["val_auc"] for h in history], label="validation ROC AUC", color="green")
    a2.plot(epochs, [h["val_acc"] for h in history], label="validation accuracy (threshold 0.5)", color="orange")
    a2.set_ylabel("ROC AUC / accuracy")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        if best:
            a.axvline(best, color="grey", linestyle="--", label=f"chosen epoch ({best})")
    a1.legend()
    a2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png")
    plt.close(fig)

    (out / "MODEL_CARD.md").write_text(model_card(metrics, summary))
    return out


def model_card(metrics: dict, s: dict) -> str:
    v = metrics["validation"]

    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"

    counts = s.get("counts", {})
    return f"""# Model card: {s['model_version']}

**Not a medical device.** This model is a research and engineering demonstration. It must not be
used to diagnose, treat or triage patients.

## What it does
Classifies a frontal paediatric chest X-ray as NORMAL or PNEUMONIA. It outputs the probability of
PNEUMONIA; the label is PNEUMONIA when that probability is at or above the decision threshold
**{pct(v['threshold'])}**, chosen on the validation split ({s['threshold_policy']}).

## Model
- Architecture: {s['architecture']}, trained from {'ImageNet weights' if s.get('pretrained') else 'scratch'}
- Input: {s['preprocessing']['size']} x {s['preprocessing']['size']} px, {s['preprocessing']['channels']} channel(s), resize policy "{s['preprocessing']['resize']}"
- Initial weights: {s.get('initial_weights') or 'random (trained from scratch)'}
- Best epoch (chosen on validation {s.get('select_metric', 'roc_auc')}): {s['best_epoch']} of {s['epochs']}; softmax temperature {s['temperature']:.3f} (fitted on validation)
- Trained on: {s['device']}, {s['started_at']} to {s['finished_at']}

## Data
- Training images: {counts.get('train', {})}; validation images: {counts.get('val', {})}
- Validation: {s['val_source']}
- Dataset fingerprint: `{s['fingerprint']}`

{DATA_CREDIT}

## Results at the threshold {pct(v['threshold'])}, with 95 % intervals
{results_table(metrics)}
The validation split also chose the checkpoint, threshold and temperature: its figures are
optimistic. Independent figures come from data the model never saw (the pipeline's Evaluate step
scores every candidate on the dataset's test split; `python -m training_job.evaluate` does the same
by hand). Plots: `roc.png`, `confusion_matrix.png`, `reliability.png`, `learning_curves.png`.

## Limitations
- Paediatric patients (ages 1-5) from one hospital; other populations, adult X-rays, lateral views
  and other devices are out of distribution.
- Trained on images squashed to a square; serving squashes the same way.
- A heatmap shows where the network's evidence lies, not a lesion outline.
"""


SET_NAMES = {"validation": "validation (chose checkpoint, temperature, threshold)", "test": "test split (independent)"}
COLUMN_NAMES = {"accuracy": "accuracy", "roc_auc": "ROC AUC", "sensitivity": "sensitivity",
                "specificity": "specificity", "sens_at_spec90": "sensitivity at specificity 0.90"}


def results_table(metrics: dict) -> str:
    """A Markdown table: one row per evaluation set in ``metrics`` that has intervals."""
    sets = [k for k, m in metrics.items() if isinstance(m, dict) and "ci" in m]
    head = "| set | n | " + " | ".join(COLUMN_NAMES[c] for c in CI_METRICS) + " |\n"
    head += "|---|---:|" + "---:|" * len(CI_METRICS) + "\n"
    rows = "".join(f"| {SET_NAMES.get(k, k)} | {metrics[k]['n']} | "
                   + " | ".join(format_with_ci(metrics[k], c) for c in CI_METRICS) + " |\n" for k in sets)
    return head + rows
