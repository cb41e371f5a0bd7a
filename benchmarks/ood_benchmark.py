"""Out-of-distribution benchmark: what the refusal check refuses, what it lets through, what it costs.

    .venv/bin/python -m training_job.ood --bundle models/reference/model.tar.gz --data DEV_FOLDER --out runs/ood/model.tar.gz
    .venv/bin/python benchmarks/ood_benchmark.py --bundle runs/ood/model.tar.gz

(``--make-dev-folder runs/ood/dev`` links the development part of ``../shared/data`` the reference
model was trained on, for ``--data``.) Every image goes through the serving path: bytes ->
``shared.imaging.decode_image`` (the DICOM header rules) -> ``OnnxPredictor.predict`` (the pixel
check). Reported:

1. **Refused per kind** of the corpus ``benchmarks/ood_corpus.py`` makes (14 kinds, 210 images),
   with the 95 % Wilson interval; target at least 95 % per kind.
2. **Accepted real frontal chest X-rays**: the held-out part of ``train`` the reference model never
   saw (``recipe_benchmark.holdout_split``), the dev half ``test/``, the six full-size originals,
   and the originals re-encoded as PNG, 16-bit PNG and DICOM (CR, PA, CHEST; and with no tags);
   target at least 99.5 %.
3. **Added latency per warm request**: the predictor's ``predict`` on a decoded X-ray with the check
   and without it (``check=False``), p50 over ``--warm`` runs of the six originals, and the check's
   own arithmetic (``OodCheck.assess``); target at most 2 ms.

The table goes to stdout and to ``benchmarks/results/ood.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the inference image runs (inference_lambda/Dockerfile)

import numpy as np  # noqa: E402
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ood_corpus  # noqa: E402
from recipe_benchmark import DATA, holdout_split, link_tree  # noqa: E402

from shared.bundle import read_bundle  # noqa: E402
from shared.imaging import ImageError, decode_image  # noqa: E402
from shared.ood import NotAChestXray  # noqa: E402
from shared.predictor import OnnxPredictor  # noqa: E402
from shared.preprocessing import decode_min_side, to_model_pixels  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ood.md"
ORIGINALS = DATA / "chest_xray_original_sample"
DEV_HALF = DATA / "chest_xray_224" / "test"


def wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def outcome(predictor: OnnxPredictor, data: bytes, fmt: str | None) -> str:
    """'refused' (422 not_a_chest_xray), 'accepted', or 'error:<code>' for another refusal."""
    try:
        decoded = decode_image(data, fmt, decode_min_side(predictor.spec))
        predictor.predict(decoded)
    except NotAChestXray:
        return "refused"
    except ImageError as exc:
        return f"error:{exc.code}"
    return "accepted"


def xray_variants(path: Path) -> list[tuple[str, bytes, str]]:
    """A full-size original as the formats a client may send."""
    img = Image.open(path).convert("L")
    arr = np.asarray(img)
    out = [("jpeg", path.read_bytes(), "jpeg")]
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out.append(("png8", buf.getvalue(), "png"))
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16) * 257).save(buf, "PNG")
    out.append(("png16", buf.getvalue(), "png"))
    out.append(("dicom_cr_pa_chest", ood_corpus.dicom_bytes(arr, "CR", "PA", "CHEST"), "dicom"))
    out.append(("dicom_dx_ap", ood_corpus.dicom_bytes(arr, "DX", "AP", None), "dicom"))
    out.append(("dicom_no_tags", ood_corpus.dicom_bytes(arr, None, None, None), "dicom"))
    return out


def real_sets(held: list[tuple[str, int]]) -> dict[str, list[tuple[str, bytes, str]]]:
    originals = sorted(ORIGINALS.glob("train/*/*.jpeg"))
    return {
        "held-out part of train (never trained on)": [(r, (DATA / r).read_bytes(), "jpeg") for r, _ in held],
        "test/ dev half": [(p.name, p.read_bytes(), "jpeg") for p in sorted(DEV_HALF.glob("*/*.jpeg"))],
        "six full-size originals, JPEG/PNG/16-bit PNG/DICOM": [v for p in originals for v in xray_variants(p)],
    }


def latency(bundle, warm: int) -> dict[str, float]:
    # As the Lambda serves (inference_lambda.model_store): intra-op threads sleep between runs
    # instead of spinning, which would compete with the check's arithmetic for the same cores.
    with_check, without = OnnxPredictor(bundle, spin_wait=False), OnnxPredictor(bundle, spin_wait=False, check=False)
    images = [decode_image(p.read_bytes(), "jpeg", decode_min_side(with_check.spec))
              for p in sorted(ORIGINALS.glob("train/*/*.jpeg"))]
    pixels = [to_model_pixels(d.image, with_check.spec) for d in images]
    feats = [with_check.run_pixels(px, with_features=True)[1] for px in pixels]
    times: dict[str, list[float]] = {"with": [], "without": [], "assess": [], "added": []}
    for _ in range(3):  # warm up
        for d in images:
            with_check.predict(d)
            without.predict(d)
    for i in range(warm):
        d = images[i % len(images)]
        order = [("with", with_check), ("without", without)] if i % 2 else [("without", without), ("with", with_check)]
        for name, pred in order:
            t0 = time.perf_counter()
            pred.predict(d)
            times[name].append((time.perf_counter() - t0) * 1000)
        times["added"].append(times["with"][-1] - times["without"][-1])
        t0 = time.perf_counter()
        with_check.ood.assess(pixels[i % len(images)], feats[i % len(images)])
        times["assess"].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def fitted_on(info: dict) -> str:
    """The bundle's ``ood.fitted_on`` record as a sentence."""
    return (f"fitted on {info.get('training_images', '?')} training images with "
            f"{info.get('view_images_per_class', '?')} turned, inverted or cropped copies per view, cut-offs on "
            f"{info.get('validation_images', '?')} validation images, of which {info.get('validation_refused', 0):.2%} "
            "are refused")


def run(bundle_path: Path, warm: int) -> str:
    bundle = read_bundle(bundle_path)
    predictor = OnnxPredictor(bundle)
    if predictor.ood is None:
        raise SystemExit(f"{bundle_path} carries no out-of-distribution check; fit one with python -m training_job.ood")
    lines = [f"# Out-of-distribution refusal: model {bundle.version}, check `{predictor.ood.meta.get('name')}`", "",
             f"Distance cut-off {predictor.ood.cutoff:.1f}, upright cut-off {predictor.ood.view_cutoff:.4f} "
             f"({predictor.ood.meta.get('cutoff_policy')}; {fitted_on(predictor.ood.meta.get('fitted_on') or {})}).", "",
             "## Out-of-distribution corpus (`benchmarks/ood_corpus.py`, target >= 95 % refused per kind)", "",
             "| kind | refused / total | refused | 95 % CI | other outcomes |", "|---|---:|---:|---|---|"]
    all_k = all_n = 0
    ok_kinds = True
    for kind in ood_corpus.KINDS:
        outcomes = [outcome(predictor, data, fmt) for _, data, fmt in ood_corpus.generate(kind)]
        k, n = outcomes.count("refused"), len(outcomes)
        lo, hi = wilson(k, n)
        others = {o: outcomes.count(o) for o in set(outcomes) if o != "refused"}
        ok_kinds &= k / n >= 0.95
        all_k, all_n = all_k + k, all_n + n
        lines.append(f"| {kind} | {k} / {n} | {k / n:.1%} | {lo:.1%} - {hi:.1%} | "
                     f"{', '.join(f'{o} {c}' for o, c in sorted(others.items())) or '-'} |")
    lo, hi = wilson(all_k, all_n)
    lines.append(f"| **all** | **{all_k} / {all_n}** | **{all_k / all_n:.1%}** | {lo:.1%} - {hi:.1%} | |")
    lines += ["", "## Real frontal chest X-rays (target >= 99.5 % accepted)", "",
              "| set | accepted / total | accepted | 95 % CI | refused files |", "|---|---:|---:|---|---|"]
    _, held = holdout_split()
    tot_k = tot_n = 0
    for name, items in real_sets(held).items():
        outcomes = [(item[0], outcome(predictor, item[1], item[2])) for item in items]
        refused = [f for f, o in outcomes if o != "accepted"]
        k, n = len(outcomes) - len(refused), len(outcomes)
        tot_k, tot_n = tot_k + k, tot_n + n
        lo, hi = wilson(k, n)
        lines.append(f"| {name} | {k} / {n} | {k / n:.2%} | {lo:.2%} - {hi:.2%} | "
                     f"{', '.join(Path(f).name for f in refused[:8]) or '-'}{' ...' if len(refused) > 8 else ''} |")
    lo, hi = wilson(tot_k, tot_n)
    lines.append(f"| **all** | **{tot_k} / {tot_n}** | **{tot_k / tot_n:.2%}** | {lo:.2%} - {hi:.2%} | |")
    lat = latency(bundle, warm)
    added = lat["added"]
    lines += ["", f"## Added latency per warm request (target <= 2 ms), p50 of {warm} predictions of the six originals",
              "", "| predictor.predict without the check | with the check | added (median of paired differences) | "
              "the check's arithmetic alone |",
              "|---:|---:|---:|---:|",
              f"| {lat['without']:.2f} ms | {lat['with']:.2f} ms | {added:+.2f} ms | {lat['assess']:.3f} ms |", "",
              f"Targets: corpus per kind >= 95 % refused: {'met' if ok_kinds else 'NOT met'}; real X-rays >= 99.5 % "
              f"accepted: {'met' if tot_k / tot_n >= 0.995 else 'NOT met'}; added latency <= 2 ms: "
              f"{'met' if added <= 2.0 else 'NOT met'}.",
              "", f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}; "
              "refusals of turned or inverted X-rays run the network a second time on the corrected image, which "
              "only refused requests pay."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a bundle with the check (format 2)")
    ap.add_argument("--warm", type=int, default=200, help="warm predictions timed per side (default 200)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--make-dev-folder", type=Path,
                    help="link the development part of ../shared/data (what the reference model trained on) here, "
                         "for python -m training_job.ood --data, and exit")
    args = ap.parse_args(argv)
    if args.make_dev_folder:
        dev, _ = holdout_split()
        link_tree(dev, args.make_dev_folder, with_split=True)
        print(f"linked {len(dev)} images under {args.make_dev_folder}/train")
        return 0
    if not args.bundle:
        ap.error("--bundle is required")
    table = run(args.bundle, args.warm)
    print(table)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
