"""Score a model bundle on a folder of labelled X-rays, through the serving path.

    python -m training_job.evaluate --bundle runs/model --data path/to/chest_xray/test --out runs/eval

``--data`` is a folder with NORMAL/ and PNEUMONIA/ inside, or a dataset root whose split folder
(``--split``, default test, else val, else train) has them. Images go through the same decoding,
preprocessing and ONNX Runtime predictor the Lambda uses, at the bundle's own threshold. Writes
``metrics.json`` and ``predictions.csv`` (path, true label, probability of PNEUMONIA).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from shared.bundle import BundleError, read_bundle
from shared.cli import HelpFormatter
from shared.dataset import DatasetLayoutError, scan_channel
from shared.evaluation import format_with_ci, metrics_with_ci
from shared.labels import CLASS_NAMES
from shared.predictor import OnnxPredictor
from shared.scoring import score
from training_job.report import write_json


def find_class_root(data: Path, split: str | None) -> Path:
    """The folder holding NORMAL/ and PNEUMONIA/: ``data`` itself, or its ``split`` folder (default:
    test, else val, else train). Raises :class:`DatasetLayoutError` naming what is missing."""
    if not data.is_dir():
        raise DatasetLayoutError(f"data folder {data} does not exist")
    if any((data / c).is_dir() or (data / c.lower()).is_dir() for c in CLASS_NAMES):
        return data
    if split and not (data / split).is_dir():
        raise DatasetLayoutError(f"{data} has no {split}/ folder (--split) and no NORMAL/ or PNEUMONIA/ folder")
    for name in ([split] if split else ["test", "val", "train"]):
        if (data / name).is_dir():
            return data / name
    raise DatasetLayoutError(f"{data} has neither NORMAL/ and PNEUMONIA/ folders nor a split folder holding them")


def evaluate(bundle_path: Path, data: Path, out: Path, split: str | None = None, progress: bool = False) -> dict:
    """Score the bundle at ``bundle_path`` on the labelled images under ``data``; write
    ``metrics.json`` and ``predictions.csv`` into ``out``; return the metrics
    (:func:`shared.evaluation.metrics_with_ci`, with ``skipped``: the unreadable files, each with its
    code and reason). Raises :class:`BundleError` or :class:`DatasetLayoutError` on a missing or
    unusable bundle or data folder, :class:`OSError` when ``out`` cannot be written."""
    bundle = read_bundle(bundle_path)
    predictor = OnnxPredictor(bundle)
    root = find_class_root(data, split)
    layout = scan_channel(root, "eval")
    if "eval" not in layout.files:
        raise DatasetLayoutError(f"no NORMAL/ or PNEUMONIA/ images under {root}")
    items = [(str(root / rel.split("/", 1)[1]), CLASS_NAMES.index(cls), Path(root / rel.split("/", 1)[1]).read_bytes)
             for cls in CLASS_NAMES for rel in layout.files["eval"][cls]]
    rows = score(items, [predictor])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, total=len(items), desc="evaluate", unit="img")
    scored, skipped = [], []
    for row in rows:
        if row.ok:
            scored.append(row)
        else:
            skipped.append({"file": row.key, "code": row.error_code, "reason": row.error})
    if not scored:
        raise DatasetLayoutError(f"no readable images under {root}")
    y = np.asarray([r.label for r in scored])
    probs = np.asarray([r.probabilities[0] for r in scored])
    metrics = metrics_with_ci(y, probs, bundle.threshold)
    metrics.update({"model_version": bundle.version, "data": str(root), "skipped": skipped})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability_pneumonia"])
        for r in scored:
            w.writerow([r.key, CLASS_NAMES[int(r.label)], f"{r.probabilities[0]:.6f}"])
    return metrics


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training_job.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="bundle folder or model.tar.gz")
    ap.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/, or a dataset root")
    ap.add_argument("--split", help="split folder to use under a dataset root (default: test, else val, else train)")
    ap.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for metrics.json and predictions.csv")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # before scoring: a folder that cannot be written fails at once
        m = evaluate(args.bundle, args.data, args.out, args.split, progress=sys.stderr.isatty())
    except (BundleError, DatasetLayoutError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"evaluation failed: cannot write results to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for s in m["skipped"]:
        print(f"skipped unreadable image {s['file']}: {s['reason']}", file=sys.stderr)
    missing = [c for c, count in zip(CLASS_NAMES, (m["negatives"], m["positives"]), strict=True) if count == 0]
    split = Path(m["data"]).name
    if split == "train" and args.split != "train":
        print(f"warning: {args.data} has no test/ or val/ split, so these are the TRAINING images "
              f"({m['data']}): the figures overstate the model; evaluate on images it never saw", file=sys.stderr)
    print(f"scored {m['data']} ({split}/)")
    print(f"{m['n']} images, threshold {m['threshold']:.4f} (95% CI): accuracy {format_with_ci(m, 'accuracy', 4)}, "
          f"sensitivity {format_with_ci(m, 'sensitivity', 4)}, specificity {format_with_ci(m, 'specificity', 4)}, "
          f"ROC AUC {format_with_ci(m, 'roc_auc', 4)}"
          + (f"; {len(m['skipped'])} unreadable image{'s' if len(m['skipped']) > 1 else ''} skipped"
             if m["skipped"] else "")
          + (f" (no {' or '.join(missing)} images: ROC AUC needs both classes)" if missing else ""))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'predictions.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
