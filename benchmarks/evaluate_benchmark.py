"""Throughput of the Evaluate step's scoring loop (shared.scoring): images per second per vCPU.

    python benchmarks/evaluate_benchmark.py --bundle models/reference/model.tar.gz --data ../shared/data/chest_xray_224/test

Decodes, preprocesses and predicts every image under ``--data`` (NORMAL/ and PNEUMONIA/) with the
bundle through the serving path, with 1 and 2 ONNX Runtime threads, from local files (S3 fetching
overlaps scoring in the step, in a thread pool). Prints a table and writes
``benchmarks/results/evaluate.md``. The Evaluate step scores two models per image; a 10,000-image
set at R images/s per vCPU on the step's 6 vCPUs takes about 2 x 10,000 / (6 R) seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.bundle import read_bundle  # noqa: E402
from shared.labels import CLASS_NAMES  # noqa: E402
from shared.predictor import OnnxPredictor  # noqa: E402
from shared.scoring import score  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/reference/model.tar.gz"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray_224/test"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluate.md")
    args = ap.parse_args()
    bundle = read_bundle(args.bundle)
    files = [(p, i) for i, c in enumerate(CLASS_NAMES) for p in sorted((args.data / c).iterdir())]
    lines = [f"Evaluate-step scoring, {bundle.version} ({bundle.preprocessing.size} px), {len(files)} images from "
             f"{args.data}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, shared machine",
             "", "| ONNX Runtime threads | seconds | images/s | images/s per vCPU | 10,000 images x 2 models on 6 vCPUs |",
             "|---|---|---|---|---|"]
    for threads in (1, 2):
        predictor = OnnxPredictor(bundle, threads=threads)
        list(score([(str(p), i, p.read_bytes) for p, i in files[:32]], [predictor]))  # warm-up
        t = time.perf_counter()
        rows = list(score([(str(p), i, p.read_bytes) for p, i in files], [predictor]))
        dt = time.perf_counter() - t
        rate = len(rows) / dt
        lines.append(f"| {threads} | {dt:.1f} | {rate:.0f} | {rate / threads:.0f} | {2 * 10000 / (6 * rate / threads):.0f} s |")
    print("\n".join(lines))
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
