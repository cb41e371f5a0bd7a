"""Reproduce a training recipe end to end on CPU and score it on a held-out part of train.

    python benchmarks/recipe_benchmark.py --name default            # the entrypoint's defaults
    python benchmarks/recipe_benchmark.py --name r18-160 -- --architecture resnet18 --image-size 160

1. Split ``../shared/data/chest_xray_224/train`` into development (85 %) and held-out (15 %)
   parts, stratified and grouped by patient and by byte-identical duplicates (seed 2018; the
   training job's own validation split uses another seed inside the development part).
2. Run the training entrypoint on the development part as a subprocess (it splits its own
   validation set and chooses checkpoint, temperature and threshold on it).
3. Score the bundle on the held-out part with the evaluation command (the serving path, at the
   bundle's threshold). No choice is made on the held-out part.

Each run appends a row to ``benchmarks/results/recipes.jsonl`` and the table of all rows is
rewritten to ``benchmarks/results/recipes.md``. The official test split is not here and is never
used.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.dataset import patient_key  # noqa: E402
from shared.labels import CLASS_NAMES  # noqa: E402
from training_job.data import group_ids, grouped_split  # noqa: E402
from training_job.evaluate import evaluate  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HOLDOUT_SEED = 2018
HOLDOUT_FRACTION = 0.15
RESULTS = ROOT / "benchmarks" / "results"


def holdout_split(data: Path = DATA) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(development, held-out) lists of (path relative to data/, label) from the manifest."""
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    rels = [r["relative_path"] for r in rows]
    labels = np.asarray([CLASS_NAMES.index(r["label"]) for r in rows])
    groups = group_ids([patient_key(r) for r in rels], [r["sha256"] for r in rows])
    keep, held = grouped_split(labels, groups, HOLDOUT_FRACTION, HOLDOUT_SEED)
    return [(rels[i], int(labels[i])) for i in keep], [(rels[i], int(labels[i])) for i in held]


def link_tree(items, dest: Path, with_split: bool, data: Path = DATA) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    for rel, label in items:
        target = dest / ("train" if with_split else "") / CLASS_NAMES[label] / Path(rel).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((data / rel).resolve(), target)
    return dest


def sensitivity_at_specificity(y, p, spec: float) -> float:
    fpr, tpr, _ = roc_curve(y, p)
    ok = tpr[fpr <= 1 - spec]
    return float(ok.max()) if ok.size else 0.0


def table(rows: list[dict]) -> str:
    head = ("| recipe | device | wall min | val AUC | held-out acc | held-out AUC | sens | spec | sens @ spec>=0.90 | "
            "settings |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
    body = ""
    for r in rows:
        h = r["holdout"]
        body += (f"| {r['name']} | {r.get('device', '')} | {r['wall_seconds'] / 60:.1f} | {r['val'].get('roc_auc', float('nan')):.4f} | "
                 f"{h['accuracy']:.4f} | {h['roc_auc']:.4f} | {h['sensitivity']:.4f} | {h['specificity']:.4f} | "
                 f"{h['sens_at_spec90']:.4f} | `{' '.join(r['args']) or '(defaults)'}` |\n")
    notes = "".join(f"- **{r['name']}**: {r['note']}\n" for r in rows if r.get("note"))
    return head + body + ("\nNotes:\n" + notes if notes else "")


def render(rows: list[dict]) -> str:
    return ("# Recipe results\n\nHeld-out = 15 % of train, patient-grouped (seed 2018), never used for "
            "any choice. Wall minutes include decoding, training, calibration, export and evaluation. The CPU runs "
            "shared 2 cores with other work (load average 4-6), so a quiet machine is faster. Produced by "
            "`python benchmarks/recipe_benchmark.py --name NAME -- HYPERPARAMETERS`.\n\n" + table(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cxr-recipes"))
    ap.add_argument("--note", default="")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="a copy of the data folder (manifest.csv, chest_xray_224/) on a machine without ../shared")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where recipes.jsonl and recipes.md are kept")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: hyperparameters for the entrypoint")
    args = ap.parse_args()
    extra = [a for a in args.train_args if a != "--"]

    dev, held = holdout_split(args.data)
    work = args.work / args.name
    dev_root = link_tree(dev, work / "dev", with_split=True, data=args.data)
    held_root = link_tree(held, work / "holdout", with_split=False, data=args.data)
    cmd = [sys.executable, "-m", "training_job.train", "--data", str(dev_root), "--model-dir", str(work / "model"),
           "--output-data-dir", str(work / "output"), "--checkpoint-dir", str(work / "checkpoints"),
           "--progress", "plain", *extra]
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    m = evaluate(work / "model", held_root, work / "holdout-eval")
    preds = list(csv.DictReader(open(work / "holdout-eval" / "predictions.csv")))
    y = np.asarray([CLASS_NAMES.index(p["label"]) for p in preds])
    p = np.asarray([float(p["probability_pneumonia"]) for p in preds])
    bundle = json.loads((work / "model" / "bundle.json").read_text())
    row = {
        "name": args.name, "args": extra, "note": args.note, "wall_seconds": wall,
        "val": bundle["metrics"]["validation"],
        "holdout": {k: m[k] for k in ("n", "accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1",
                                      "threshold", "confusion_matrix")}
                   | {"sens_at_spec90": sensitivity_at_specificity(y, p, 0.90)},
        "holdout_counts": {"dev": len(dev), "held_out": len(held)},
        "device": bundle["provenance"]["device"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "recipes.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in open(args.results / "recipes.jsonl")]
    (args.results / "recipes.md").write_text(render(rows))
    print(table([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
