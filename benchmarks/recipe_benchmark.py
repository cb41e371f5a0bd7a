"""Reproduce a training recipe end to end and judge it on new patients as well as on its own
population.

    python benchmarks/recipe_benchmark.py --name default            # the entrypoint's defaults
    python benchmarks/recipe_benchmark.py --name lite0-128 -- --architecture efficientnet_lite0 --pretrained --image-size 128
    python benchmarks/recipe_benchmark.py --name reference --score-bundle models/reference/model.tar.gz

1. Split ``../shared/data/chest_xray_224/train`` into development (85 %) and held-out (15 %)
   parts, stratified and grouped by patient and by byte-identical duplicates (seed 2018; the
   training job's own validation split uses another seed inside the development part).
2. Run the training entrypoint on the development part as a subprocess (it splits its own
   validation set and chooses checkpoint, temperature and threshold on it).
3. Score the bundle through the serving path (the evaluation command, at the bundle's own
   threshold) on two sets, each figure with a 95 % bootstrap interval (:mod:`shared.evaluation`):
   - the **held-out part of train**: same population and acquisition period as training; every
     recipe saturates it, so it only shows that a run fitted;
   - the **dev half of the official test split** (``chest_xray_224/test``, new patients): the
     set recipes are compared on. No choice inside the run is made on it.
4. Report what other threshold *policies*, each applied to the run's own validation predictions,
   would have given on the dev half: the policy is a recipe choice, the threshold is not.

Each run appends a row to ``benchmarks/results/recipes.jsonl`` (failed runs too, with the reason)
and the table of all rows is rewritten to ``benchmarks/results/recipes.md``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.bundle import read_bundle  # noqa: E402
from shared.dataset import patient_key  # noqa: E402
from shared.evaluation import format_with_ci, metrics_at_threshold, metrics_with_ci  # noqa: E402
from shared.labels import CLASS_NAMES  # noqa: E402
from training_job.data import group_ids, grouped_split  # noqa: E402
from training_job.evaluate import evaluate  # noqa: E402
from training_job.metrics import threshold_for_policy  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HOLDOUT_SEED = 2018
HOLDOUT_FRACTION = 0.15
RESULTS = ROOT / "benchmarks" / "results"
# Threshold policies compared on the dev half: name -> function of (validation labels, validation
# probabilities) giving a threshold. Each uses validation data only, as a training run must.
POLICIES = {
    "youden (plateau median)": lambda y, p: threshold_for_policy("youden", y, p)[0],
    "validation sensitivity 0.95": lambda y, p: threshold_for_policy("sensitivity", y, p, 0.95)[0],
    "validation sensitivity 0.98": lambda y, p: threshold_for_policy("sensitivity", y, p, 0.98)[0],
    "balanced: calibrated 0.5": lambda y, p: threshold_for_policy("balanced", y, p)[0],
}


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


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return (np.asarray([CLASS_NAMES.index(r["label"]) for r in rows]),
            np.asarray([float(r["probability_pneumonia"]) for r in rows]))


def score(bundle: Path, data: Path, out: Path) -> dict:
    """Figures with intervals of ``bundle`` on a labelled folder, through the serving path."""
    evaluate(bundle, data, out)
    y, p = read_predictions(out / "predictions.csv")
    return metrics_with_ci(y, p, read_bundle(bundle).threshold)


def policies(val_csv: Path, dev_csv: Path) -> dict:
    """Dev-half accuracy, sensitivity and specificity at each policy's validation threshold."""
    if not val_csv.is_file():
        return {}
    yv, pv = read_predictions(val_csv)
    yd, pd = read_predictions(dev_csv)
    out = {}
    for name, rule in POLICIES.items():
        t = float(rule(yv, pv))
        m = metrics_at_threshold(yd, pd, t)
        out[name] = {k: m[k] for k in ("threshold", "accuracy", "sensitivity", "specificity")}
    return out


def _cell(m: dict | None, key: str) -> str:
    return format_with_ci(m, key) if m else ""


def table(rows: list[dict]) -> str:
    head = ("| recipe | device | wall min | val AUC | held-out AUC | dev acc | dev AUC | dev sens | dev spec | "
            "dev sens @ spec 0.90 | settings |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    body = ""
    for r in rows:
        if r.get("failed"):
            body += (f"| {r['name']} | {r.get('device', '')} | {r['wall_seconds'] / 60:.1f} | failed | | | | | | | "
                     f"`{' '.join(r['args']) or '(defaults)'}` |\n")
            continue
        h, d = r["holdout"], r.get("dev")
        val_auc = r["val"].get("roc_auc") if r.get("val") else None
        body += (f"| {r['name']} | {r.get('device', '')} | {r['wall_seconds'] / 60:.1f} | "
                 f"{'' if val_auc is None else f'{val_auc:.4f}'} | {_cell(h, 'roc_auc')} | {_cell(d, 'accuracy')} | "
                 f"{_cell(d, 'roc_auc')} | {_cell(d, 'sensitivity')} | {_cell(d, 'specificity')} | "
                 f"{_cell(d, 'sens_at_spec90')} | `{' '.join(r['args']) or '(defaults)'}` |\n")
    return head + body


def policy_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("policies")]
    if not rows:
        return ""
    out = ("| recipe | policy (on validation) | threshold | dev acc | dev sens | dev spec |\n"
           "|---|---|---:|---:|---:|---:|\n")
    for r in rows:
        for name, m in r["policies"].items():
            out += (f"| {r['name']} | {name} | {m['threshold']:.3f} | {m['accuracy']:.3f} | {m['sensitivity']:.3f} | "
                    f"{m['specificity']:.3f} |\n")
    return out


def render(rows: list[dict], preamble: str = "") -> str:
    notes = "".join(f"- **{r['name']}**: {r['note']}\n" for r in rows if r.get("note"))
    return ("# Recipe results\n\n"
            "Each figure is followed by its 95 % bootstrap interval (2,000 resamples, seed 0). **Dev** = the dev half "
            "of the official test split (`chest_xray_224/test`, 311 images of new patients: 119 NORMAL, 192 "
            "PNEUMONIA), the set recipes are compared on; the bundle's own threshold, chosen on validation, is "
            "used. **Held-out** = 15 % of train, patient-grouped (seed 2018): same population as training, "
            "saturated by every recipe. Neither set is used for any choice inside a run. Wall minutes include "
            "decoding, training, calibration, export and evaluation; CPU runs shared 2 cores with other work. "
            "Rows without dev figures were run before the dev half existed and their bundles were not kept. "
            "**Settings** are the flags given on top of the default (`cpu`) recipe as it stood when the row ran: "
            "the recipe has changed over time (pretrained EfficientNet-Lite0, then a soup of three, test-time "
            "views, a wider random scale), so an early row's flags run differently today; `recipes.jsonl` keeps "
            "the resolved hyperparameters and code version of every run whose bundle was kept. "
            "Produced by `python benchmarks/recipe_benchmark.py --name NAME -- HYPERPARAMETERS`.\n\n"
            + preamble + table(rows)
            + "\n## Threshold policies\n\nWhat each policy, applied to the run's own validation predictions, gives on "
              "the dev half.\n\n" + policy_table(rows)
            + ("\nNotes:\n" + notes if notes else ""))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/recipe_benchmark.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--name", required=True, help="the row's name in the results table")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cxr-recipes"), help="scratch folder for the run")
    ap.add_argument("--note", default="", help="a note printed under the table")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="the data folder (manifest.csv, chest_xray_224/train and test)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where recipes.jsonl and recipes.md are kept")
    ap.add_argument("--score-bundle", type=Path,
                    help="score this existing bundle (its training data must be the development part) instead of training")
    ap.add_argument("--keep-bundle", type=Path, help="also write the trained bundle as this model.tar.gz")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run of the same name from its checkpoints (wall time then counts "
                         "only the resumed part)")
    ap.add_argument("--checkpoints-from", metavar="RUN",
                    help="start from the finished checkpoints of run RUN (under --work) to export it again with "
                         "other post-training settings, such as --wise-alpha; wall time counts only the export")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: hyperparameters for the entrypoint")
    args = ap.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    if args.checkpoints_from:
        source = args.work / args.checkpoints_from / "checkpoints"
        if args.checkpoints_from == args.name or args.resume:
            ap.error("--checkpoints-from starts a new run from another one's checkpoints: give a new --name, "
                     "without --resume")
        if not (source / "last.pt").is_file():
            ap.error(f"--checkpoints-from: {source} holds no finished run's checkpoints")

    dev, held = holdout_split(args.data)
    work = args.work / args.name
    held_root = link_tree(held, work / "holdout", with_split=False, data=args.data)
    dev_half = args.data / "chest_xray_224" / "test"
    t0 = time.time()
    row: dict = {"name": args.name, "args": extra, "note": args.note,
                 "holdout_counts": {"dev": len(dev), "held_out": len(held)}}
    if args.score_bundle:
        bundle = args.score_bundle
        row["args"] = [f"(scored {bundle})"]
    else:
        dev_root = link_tree(dev, work / "dev", with_split=True, data=args.data)
        bundle = work / "model"
        cmd = [sys.executable, "-m", "training_job.train", "--data", str(dev_root), "--model-dir", str(bundle),
               "--output-data-dir", str(work / "output"), "--checkpoint-dir", str(work / "checkpoints"),
               "--progress", "plain", *extra]
        if not args.resume:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        if args.checkpoints_from:
            shutil.copytree(source, work / "checkpoints")
            # the entrypoint resumes them only if every training setting matches; otherwise it trains afresh
        print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            failure = work / "failure"  # the entrypoint writes it beside --output-data-dir
            row |= {"failed": True, "wall_seconds": time.time() - t0,
                    "reason": failure.read_text().strip() if failure.is_file() else f"exit {done.returncode}"}
    if not row.get("failed"):
        meta = read_bundle(bundle)
        provenance = meta.meta["provenance"]
        row |= {"wall_seconds": time.time() - t0 if not args.score_bundle else 0.0,
                "val": meta.validation_metrics, "device": provenance.get("device", ""),
                # what ran, whatever the recipe's defaults become later
                "hyperparameters": provenance.get("hyperparameters"), "code_version": provenance.get("code_version"),
                "holdout": score(bundle, held_root, work / "holdout-eval")}
        if dev_half.is_dir():
            row["dev"] = score(bundle, dev_half, work / "dev-eval")
            row["policies"] = policies(work / "output" / "val_predictions.csv", work / "dev-eval" / "predictions.csv")
        if args.keep_bundle and not args.score_bundle:
            args.keep_bundle.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "-czf", str(args.keep_bundle), "-C", str(bundle), "."], check=True)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "recipes.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in open(args.results / "recipes.jsonl")]
    (args.results / "recipes.md").write_text(render(rows))
    print(table([row]))
    print(policy_table([row]))
    return 1 if row.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
