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
from shared.evaluation import metrics_at_threshold
from shared.imaging import ImageError, decode_file
from shared.labels import CLASS_NAMES
from shared.predictor import OnnxPredictor
from shared.preprocessing import decode_min_side, to_model_pixels
from training_job.report import write_json


def find_class_root(data: Path, split: str | None) -> Path:
    if any((data / c).is_dir() or (data / c.lower()).is_dir() for c in CLASS_NAMES):
        return data
    for name in ([split] if split else ["test", "val", "train"]):
        if (data / name).is_dir():
            return data / name
    raise DatasetLayoutError(f"{data} has neither NORMAL/ and PNEUMONIA/ folders nor a split folder holding them")


def evaluate(bundle_path: Path, data: Path, out: Path, split: str | None = None, progress: bool = False) -> dict:
    bundle = read_bundle(bundle_path)
    predictor = OnnxPredictor(bundle)
    root = find_class_root(data, split)
    layout = scan_channel(root, "eval")
    if "eval" not in layout.files:
        raise DatasetLayoutError(f"no NORMAL/ or PNEUMONIA/ images under {root}")
    rows, pixels, labels, skipped = [], [], [], []
    items = [(rel, CLASS_NAMES.index(cls)) for cls in CLASS_NAMES for rel in layout.files["eval"][cls]]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", unit="img")
    for rel, label in items:
        path = root / rel.split("/", 1)[1]
        try:
            decoded = decode_file(path, decode_min_side(bundle.preprocessing))
        except ImageError as exc:
            skipped.append({"file": str(path), "reason": exc.message})
            continue
        pixels.append(to_model_pixels(decoded.image, bundle.preprocessing))
        labels.append(label)
        rows.append(str(path))
    if not rows:
        raise DatasetLayoutError(f"no readable images under {root}")
    probs = predictor.positive_probabilities(np.stack(pixels))
    y = np.asarray(labels)
    metrics = metrics_at_threshold(y, probs, bundle.threshold)
    metrics.update({"model_version": bundle.version, "data": str(root), "skipped": skipped})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability_pneumonia"])
        for path, label, p in zip(rows, y, probs, strict=True):
            w.writerow([path, CLASS_NAMES[int(label)], f"{p:.6f}"])
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
        m = evaluate(args.bundle, args.data, args.out, args.split, progress=sys.stderr.isatty())
    except (BundleError, DatasetLayoutError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        return 1
    print(f"{m['n']} images, threshold {m['threshold']:.4f}: accuracy {m['accuracy']:.4f}, sensitivity "
          f"{m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, ROC AUC {m['roc_auc']:.4f}"
          + (f"; {len(m['skipped'])} unreadable images skipped" if m["skipped"] else ""))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'predictions.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
