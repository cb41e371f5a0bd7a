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
from matplotlib.ticker import MaxNLocator  # noqa: E402
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
    ``history``: one row per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_auc``,
    ``val_acc``); a model soup's rows also carry ``member`` (1-based) and its
    ``summary["best_epoch"]`` is a list, one chosen epoch per network.
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
    # A model soup's history holds one run of epochs per network (rows carry "member"): one line each.
    members = sorted({h.get("member", 1) for h in history})
    chosen = best if isinstance(best, list) else [best]
    for i, member in enumerate(members):
        rows = [h for h in history if h.get("member", 1) == member]
        epochs = [h["epoch"] for h in rows]
        tag, style = (f", network {member}", ["-", "--", ":", "-."][i % 4]) if len(members) > 1 else ("", "-")
        dots = {"marker": "o", "markersize": 3}  # a one-epoch network is a point, not an invisible line
        a1.plot(epochs, [h["train_loss"] for h in rows], style, **dots, color="tab:blue", label=f"train loss{tag}")
        a1.plot(epochs, [h["val_loss"] for h in rows], style, **dots, color="tab:red", label=f"validation loss{tag}")
        a2.plot(epochs, [h["val_auc"] for h in rows], style, **dots, color="green", label=f"validation ROC AUC{tag}")
        a2.plot(epochs, [h["val_acc"] for h in rows], style, **dots, color="orange",
                label=f"validation accuracy (threshold 0.5){tag}")
    a1.set_ylabel("cross-entropy loss")
    a2.set_ylabel("ROC AUC / accuracy")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs only
        a.set_xlim(0.5, max((h["epoch"] for h in history), default=1) + 0.5)
        for i, epoch in enumerate(e for e in chosen if e):
            tag = f", network {i + 1}" if len(chosen) > 1 else ""
            a.axvline(epoch, color="grey", linestyle=["--", ":", "-.", "-"][i % 4], label=f"chosen epoch ({epoch}){tag}")
    a1.legend(fontsize="small" if len(members) > 1 else None)
    a2.legend(loc="lower right", fontsize="small" if len(members) > 1 else None)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png")
    plt.close(fig)

    (out / "MODEL_CARD.md").write_text(model_card(metrics, summary))
    return out


def _chosen_weights(s: dict) -> str:
    """The model card's line on which weights were exported: one best epoch, or a model soup's."""
    metric = s.get("select_metric", "roc_auc")
    if s.get("soup_seeds"):
        return (f"Weights: a uniform model soup, the average of {len(s['soup_seeds'])} networks fine-tuned from the "
                f"same pretrained weights (each with its own random classifier head) with seeds {', '.join(map(str, s['soup_seeds']))}, each at its best epoch on "
                f"validation {metric} ({', '.join(map(str, s['best_epoch']))} of {s['epochs']})")
    return f"Best epoch (chosen on validation {metric}): {s['best_epoch']} of {s['epochs']}"


def _test_time_views(s: dict) -> str:
    """The model card's line on the views whose logits the model averages (``summary["test_time_views"]``)."""
    views = s.get("test_time_views") or {}
    extra = (["its mirror image"] if views.get("hflip") else []) + [
        f"a copy shrunk by {z:g}" for z in views.get("zoom_out") or []]
    if not extra:
        return "Test-time views: none (the image as it is)"
    return (f"Test-time views: the logits are the mean over the image, {', '.join(extra)} (borders replicated), "
            "in the exported model itself; calibration, threshold and these figures include them")


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
- {_chosen_weights(s)}; softmax temperature {s['temperature']:.3f} (fitted on validation)
- {_test_time_views(s)}
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
