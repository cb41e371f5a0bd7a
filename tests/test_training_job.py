"""The training entrypoint under SageMaker's container contract, on real X-rays (contract 2 and 3)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, DATA_224, ROOT

from shared.bundle import read_bundle
from shared.dataset import patient_key
from shared.labels import CLASS_NAMES

METRIC_LINE = re.compile(
    r"^epoch=(\d+) train_loss=([0-9.]+) val_loss=([0-9.]+) val_auc=([0-9.]+) val_acc=([0-9.]+) lr=([0-9.e-]+)$", re.M)
QUICK = ["--architecture", "seed_cnn", "--width", "8", "--image_size", "64", "--batch-size", "16",
         "--progress", "plain", "--workers", "2"]


def subset(dest: Path, per_class: int = 40, broken: dict[str, int] | None = None) -> Path:
    """A small real dataset as symlinks (the data stays in ../shared), optionally with broken files."""
    for cls in CLASS_NAMES:
        d = dest / cls
        d.mkdir(parents=True, exist_ok=True)
        for src in sorted((DATA_224 / "train" / cls).iterdir())[:per_class]:
            (d / src.name).symlink_to(src)
        for i in range((broken or {}).get(cls, 0)):
            (d / f"broken-{i}.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    return dest


def sm_env(opt_ml: Path, train: Path | None, val: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({
        "SM_MODEL_DIR": str(opt_ml / "model"), "SM_OUTPUT_DATA_DIR": str(opt_ml / "output" / "data"),
        "SM_OUTPUT_DIR": str(opt_ml / "output"), "SM_NUM_GPUS": "0", "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
    })
    env.pop("PYTHONPATH", None)
    if train is not None:
        env["SM_CHANNEL_TRAIN"] = str(train)
    if val is not None:
        env["SM_CHANNEL_VAL"] = str(val)
    return env


def run_entrypoint(opt_ml: Path, env: dict, *hp: str, timeout=600) -> subprocess.CompletedProcess:
    # As the SageMaker PyTorch container does: `python <program> --key value ...` from the source dir.
    cmd = [sys.executable, str(ROOT / "training_job" / "train.py"), "--checkpoint_dir", str(opt_ml / "checkpoints"), *hp]
    return subprocess.run(cmd, cwd=opt_ml, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    opt_ml = tmp_path_factory.mktemp("opt_ml")
    train = subset(opt_ml / "input" / "data" / "train", 40, broken={"NORMAL": 2})
    proc = run_entrypoint(opt_ml, sm_env(opt_ml, train), "--epochs", "3", *QUICK)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return opt_ml, proc


def test_entrypoint_writes_a_valid_bundle_under_the_sagemaker_contract(trained):
    opt_ml, proc = trained
    lines = METRIC_LINE.findall(proc.stdout)
    assert [int(m[0]) for m in lines] == [1, 2, 3], proc.stdout
    bundle = read_bundle(opt_ml / "model")
    meta = bundle.meta
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["preprocessing"]["size"] == 64
    v = meta["metrics"]["validation"]
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "confusion_matrix"):
        assert key in v
    assert 0 < bundle.threshold < 1
    prov = meta["provenance"]
    assert prov["hyperparameters"]["epochs"] == 3 and prov["code_version"].startswith("src-")
    assert len(prov["dataset"]["fingerprint"]) == 64
    skipped = {s["file"] for s in prov["dataset"]["skipped"]}
    assert skipped == {"train/NORMAL/broken-0.jpeg", "train/NORMAL/broken-1.jpeg"}
    assert "skipped unreadable image train/NORMAL/broken-0.jpeg" in proc.stdout
    for f in ("metrics.json", "roc.png", "confusion_matrix.png", "learning_curves.png", "MODEL_CARD.md"):
        assert (opt_ml / "model" / "report" / f).stat().st_size > 100
    assert "not a medical device" in (opt_ml / "model" / "report" / "MODEL_CARD.md").read_text().lower()
    assert (opt_ml / "output" / "data" / "val_predictions.csv").is_file()
    assert not (opt_ml / "output" / "failure").exists()
    assert (opt_ml / "checkpoints" / "best.pt").is_file() and (opt_ml / "checkpoints" / "last.pt").is_file()


def test_validation_split_keeps_patients_apart(trained):
    opt_ml, _ = trained
    val = [r["path"] for r in csv.DictReader(open(opt_ml / "output" / "data" / "val_predictions.csv"))]
    val_patients = {patient_key(p) for p in val}
    val_names = {Path(p).name for p in val}
    all_files = {p.name for cls in CLASS_NAMES for p in (opt_ml / "input" / "data" / "train" / cls).iterdir()}
    train_patients = {patient_key(f) for f in all_files - val_names}  # what the model trained on
    assert val and train_patients and not (val_patients & train_patients)


def test_evaluation_command_scores_the_bundle(trained, tmp_path):
    opt_ml, _ = trained
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "training_job.evaluate", "--bundle", str(opt_ml / "model"),
                           "--data", str(DATA / "chest_xray_original_sample"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and set(metrics["confusion_matrix"]) == {"tn", "fp", "fn", "tp"}
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 6 and {r["label"] for r in rows} == set(CLASS_NAMES)
    assert all(0.0 <= float(r["probability_pneumonia"]) <= 1.0 for r in rows)


def test_onnx_matches_the_best_torch_checkpoint_on_real_images(trained, originals):
    import torch

    from shared.imaging import decode_file
    from shared.predictor import OnnxPredictor
    from shared.preprocessing import preprocess
    from training_job.models import build_model, with_test_time_views

    opt_ml, _ = trained
    bundle = read_bundle(opt_ml / "model")
    model = build_model("seed_cnn", 1, 2, width=8)
    state = torch.load(opt_ml / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    model.load_state_dict({k: v for k, v in state.items() if k != "n_averaged"})
    views = bundle.meta["onnx"]["test_time_views"]
    assert views == {"hflip": False, "zoom_out": [1.1, 1.2, 1.3]}  # the default (cpu) recipe's
    model = with_test_time_views(model, 64, views["hflip"], views["zoom_out"]).eval()
    predictor = OnnxPredictor(bundle)
    for path in originals:
        decoded = decode_file(path)
        x = preprocess(decoded.image, bundle.preprocessing)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()[0]
        got = predictor.predict(decoded).logits
        assert np.max(np.abs(got - ref)) <= 1e-4


def _assert_failed(opt_ml: Path, proc, needle: str):
    assert proc.returncode != 0
    failure = (opt_ml / "output" / "failure").read_text()
    assert re.search(needle, failure, re.I), failure
    assert "Traceback" not in proc.stderr
    assert not (opt_ml / "model" / "bundle.json").exists()


@pytest.mark.parametrize("case,needle", [
    ("unknown_hyperparameter", "unrecognized arguments: --bogus"),
    ("zero_epochs", "epochs must be at least 1"),
    ("missing_channel", "train channel .* does not exist"),
    ("wrong_layout", "no NORMAL/ and PNEUMONIA/ class folders"),
    ("empty_class", "class PNEUMONIA .* has no images"),
    ("all_corrupt_class", "class NORMAL in 'train' has no readable images"),
    ("bad_value", "argument --epochs: invalid int value"),
])
def test_bad_input_fails_clearly_and_leaves_no_bundle(tmp_path, case, needle):
    opt_ml = tmp_path
    train = opt_ml / "input" / "data" / "train"
    hp = ["--epochs", "1", *QUICK]
    if case == "unknown_hyperparameter":
        subset(train, 10)
        hp += ["--bogus", "1"]
    elif case == "zero_epochs":
        subset(train, 10)
        hp = ["--epochs", "0", *QUICK]
    elif case == "missing_channel":
        pass
    elif case == "wrong_layout":
        train.mkdir(parents=True)
        for src in sorted((DATA_224 / "train" / "NORMAL").iterdir())[:3]:
            (train / src.name).symlink_to(src)
    elif case == "empty_class":
        subset(train, 10)
        for f in (train / "PNEUMONIA").iterdir():
            f.unlink()
    elif case == "all_corrupt_class":
        subset(train, 10)
        for f in (train / "NORMAL").iterdir():
            f.unlink()
        (train / "NORMAL" / "x.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    elif case == "bad_value":
        subset(train, 10)
        hp = ["--epochs", "many", *QUICK]
    # a bundle from an earlier run must not survive a failed one
    (opt_ml / "model").mkdir(parents=True, exist_ok=True)
    (opt_ml / "model" / "bundle.json").write_text("{}")
    proc = run_entrypoint(opt_ml, sm_env(opt_ml, train), *hp)
    _assert_failed(opt_ml, proc, needle)


def test_local_failure_touches_only_the_folders_the_command_named(tmp_path):
    """A local run (no SageMaker) that fails leaves the default runs/ folder alone: it may hold another
    run's model. With unreadable arguments nothing is written; otherwise the named folders get the
    failure file and lose their bundle."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    default = tmp_path / "runs" / "model"
    default.mkdir(parents=True)
    (default / "bundle.json").write_text("{}")
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "bundle.json").write_text("{}")
    named = ["--model-dir", str(mine / "model"), "--output-data-dir", str(mine / "output" / "data")]
    for bad in (["--soup", "0"], ["--soup", "abc"]):
        proc = run_entrypoint(tmp_path, env, *named, *bad, "--train", str(DATA_224 / "train"))
        assert proc.returncode == 1 and "training failed: " in proc.stderr and "Traceback" not in proc.stderr
        assert (default / "bundle.json").exists() and not (tmp_path / "runs" / "output").exists()
    missing = run_entrypoint(tmp_path, env, *named, "--train", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "does not exist" in (mine / "output" / "failure").read_text()
    assert not (mine / "model" / "bundle.json").exists() and (default / "bundle.json").exists()


def test_dashes_and_underscores_and_string_booleans_are_accepted():
    from training_job.train import parse_args

    a = parse_args(["--train", str(DATA_224 / "train"), "--image_size", "96", "--label-smoothing", "0.1",
                    "--tta", "true", "--calibrate", "False"])
    assert a.image_size == 96 and a.label_smoothing == 0.1 and a.tta is True and a.calibrate is False


def test_booleans_are_flags_that_still_take_an_explicit_value():
    from training_job.train import TrainingError, parse_args

    train = str(DATA_224 / "train")
    bare = parse_args(["--train", train, "--tta", "--epochs", "3", "--hflip", "--amp=false", "--calibrate", "no"])
    assert (bare.tta, bare.hflip, bare.amp, bare.calibrate, bare.epochs) == (True, True, False, False, 3)
    last = parse_args(["--train", train, "--recipe", "quick", "--architecture", "resnet18", "--pretrained"])
    assert last.pretrained is True and last.architecture == "resnet18"
    assert parse_args(["--train", train]).pretrained is True  # the default recipe's
    assert parse_args(["--train", train, "--pretrained", "false"]).pretrained is False
    with pytest.raises(TrainingError, match="--tta: expected true or false, got 'maybe'"):
        parse_args(["--train", train, "--tta", "maybe"])


def test_interrupted_job_resumes_from_its_checkpoint(tmp_path):
    opt_ml = tmp_path
    train = subset(opt_ml / "input" / "data" / "train", 30)
    env = sm_env(opt_ml, train)
    hp = ["--epochs", "4", *QUICK]
    cmd = [sys.executable, str(ROOT / "training_job" / "train.py"), "--checkpoint_dir", str(opt_ml / "checkpoints"), *hp]
    # A spot interruption: the process is killed mid-run, after at least two epochs were checkpointed.
    proc = subprocess.Popen(cmd, cwd=opt_ml, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch=3 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert any(s.startswith("epoch=3 ") for s in seen), "".join(seen)[-2000:]
    assert not (opt_ml / "model" / "bundle.json").exists()
    resumed = run_entrypoint(opt_ml, env, *hp)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resumed from checkpoint at epoch [23]", resumed.stdout)
    epochs = [int(m[0]) for m in METRIC_LINE.findall(resumed.stdout)]
    assert epochs and epochs[0] in (3, 4) and epochs[-1] == 4
    history = json.loads((opt_ml / "output" / "data" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    read_bundle(opt_ml / "model")


def test_ddp_with_two_cpu_processes(tmp_path):
    opt_ml = tmp_path
    train = subset(opt_ml / "input" / "data" / "train", 30)
    proc = run_entrypoint(opt_ml, sm_env(opt_ml, train), "--epochs", "2", "--processes_per_host", "2", *QUICK)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [int(m[0]) for m in METRIC_LINE.findall(proc.stdout)] == [1, 2]  # one line per epoch: rank 0 only
    assert read_bundle(opt_ml / "model").meta["provenance"]["hyperparameters"]["processes_per_host"] == 2


def assert_exports_soup(opt_ml: Path, networks: int) -> list[dict]:
    """The run's ``soup.pt`` is the average of its networks' best checkpoints and the bundle exports it
    (its classifier head is the one the heatmaps use); returns the networks' weights."""
    import torch

    from training_job.engine import average_weights

    ckpt = opt_ml / "checkpoints"
    paths = [ckpt / "best.pt", *(ckpt / f"member-{i}" / "best.pt" for i in range(2, networks + 1))]
    members = [torch.load(p, weights_only=False)["model"] for p in paths]
    soup = torch.load(ckpt / "soup.pt", weights_only=False)["model"]
    expected = average_weights(members)
    assert soup.keys() == expected.keys() and all(torch.equal(soup[k], v) for k, v in expected.items())
    bundle = read_bundle(opt_ml / "model")
    np.testing.assert_allclose(bundle.meta["cam"]["weights"], soup["head.weight"].double().numpy(), atol=1e-7)
    assert bundle.meta["provenance"]["hyperparameters"]["soup"] == networks
    return members


def test_ddp_soup_averages_the_networks_every_process_trained(tmp_path):
    import torch

    opt_ml = tmp_path
    train = subset(opt_ml / "input" / "data" / "train", 24)
    proc = run_entrypoint(opt_ml, sm_env(opt_ml, train), "--epochs", "1", "--processes_per_host", "2", "--soup", "2",
                          "--architecture", "efficientnet_lite0", "--pretrained", "true", "--image_size", "64",
                          "--batch-size", "8", "--progress", "plain", "--workers", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [int(m[0]) for m in METRIC_LINE.findall(proc.stdout)] == [1, 1]  # rank 0 reports each network's epoch
    assert proc.stdout.count("model soup: network 2 of 2 (seed 43)") == 1
    first, second = assert_exports_soup(opt_ml, 2)
    assert not torch.equal(first["head.weight"], second["head.weight"])


def test_metric_definitions_see_one_point_per_epoch_and_lr_keeps_its_digits(trained):
    from infra.config import METRIC_DEFINITIONS

    _, proc = trained
    regex = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}
    output = proc.stdout + proc.stderr
    auc_points = [line for line in output.splitlines() if regex["val_auc"].search(line)]
    assert len(auc_points) == 3 and all(line.startswith("epoch=") for line in auc_points), auc_points
    lrs = [float(regex["lr"].search(line).group(1)) for line in auc_points]
    assert all(lr > 0 for lr in lrs) and all("e-" in line.split("lr=")[1] for line in auc_points), lrs


def test_probed_run_exports_the_interpolated_weights_and_exports_again_without_training(tmp_path):
    import torch

    from training_job.engine import interpolate_weights

    opt_ml = tmp_path
    train = subset(opt_ml / "input" / "data" / "train", 24)
    env = sm_env(opt_ml, train)
    hp = ["--epochs", "1", "--architecture", "efficientnet_lite0", "--pretrained", "true", "--image_size", "64",
          "--batch-size", "16", "--progress", "plain", "--workers", "2", "--linear-probe-c", "0.3",
          "--soup", "1"]
    proc = run_entrypoint(opt_ml, env, *hp, "--wise-alpha", "0.5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "linear probe (C=0.3) on the frozen pretrained features" in proc.stdout
    assert "WiSE-FT: exporting 0.5 x the initial weights + 0.5 x epoch 1's" in proc.stdout
    ckpt = opt_ml / "checkpoints"
    initial, best, mixed = (torch.load(ckpt / f"{n}.pt", weights_only=False)["model"]
                            for n in ("initial", "best", "interpolated"))
    expected = interpolate_weights(initial, best, 0.5)
    assert all(torch.equal(mixed[k], v) for k, v in expected.items())
    assert not torch.equal(initial["head.weight"], best["head.weight"])  # training moved the probed head
    hyper = read_bundle(opt_ml / "model").meta["provenance"]["hyperparameters"]
    assert (hyper["linear_probe_c"], hyper["wise_alpha"]) == (0.3, 0.5)
    first = (opt_ml / "model" / "model.onnx").read_bytes()

    # The interpolation is applied after training: another value exports the finished run again.
    again = run_entrypoint(opt_ml, env, *hp, "--wise-alpha", "1.0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from checkpoint at epoch 1" in again.stdout and not METRIC_LINE.search(again.stdout)
    assert "WiSE-FT" not in again.stdout and (opt_ml / "model" / "model.onnx").read_bytes() != first


def test_soup_exports_the_average_of_its_networks_and_a_larger_soup_reuses_them(tmp_path):
    import torch

    opt_ml = tmp_path
    train = subset(opt_ml / "input" / "data" / "train", 24)
    env = sm_env(opt_ml, train)
    hp = ["--epochs", "1", "--architecture", "efficientnet_lite0", "--pretrained", "true", "--image_size", "64",
          "--batch-size", "16", "--progress", "plain", "--workers", "2"]
    proc = run_entrypoint(opt_ml, env, *hp, "--soup", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model soup: network 2 of 2 (seed 43)" in proc.stdout
    assert [int(m[0]) for m in METRIC_LINE.findall(proc.stdout)] == [1, 1]  # SageMaker sees each network's epoch
    ckpt = opt_ml / "checkpoints"
    first, second = assert_exports_soup(opt_ml, 2)
    assert not torch.equal(first["head.weight"], second["head.weight"])  # two seeds, two networks
    card = (opt_ml / "model" / "report" / "MODEL_CARD.md").read_text()
    assert "a uniform model soup, the average of 2 networks" in card and "seeds 42, 43" in card
    history = json.loads((opt_ml / "output" / "data" / "history.json").read_text())
    assert [(h["member"], h["epoch"]) for h in history] == [(1, 1), (2, 1)]

    # A larger soup trains only the network it lacks, and exports the average of all three.
    bigger = run_entrypoint(opt_ml, env, *hp, "--soup", "3")
    assert bigger.returncode == 0, bigger.stderr[-2000:]
    assert bigger.stdout.count("resumed from checkpoint at epoch 1") == 2 and "network 3 of 3 (seed 44)" in bigger.stdout
    assert len(METRIC_LINE.findall(bigger.stdout)) == 1
    assert_exports_soup(opt_ml, 3)
    history = json.loads((opt_ml / "output" / "data" / "history.json").read_text())
    assert [(h["member"], h["epoch"]) for h in history] == [(1, 1), (2, 1), (3, 1)]

    # The first network is the run without a soup: that run resumes it, and trains it alike afresh.
    alone = run_entrypoint(opt_ml, env, *hp, "--soup", "1")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "resumed from checkpoint at epoch 1" in alone.stdout and not METRIC_LINE.search(alone.stdout)
    np.testing.assert_allclose(read_bundle(opt_ml / "model").meta["cam"]["weights"],
                               first["head.weight"].double().numpy(), atol=1e-7)
    fresh = run_entrypoint(opt_ml, env, *hp, "--soup", "1", "--checkpoint_dir", str(tmp_path / "fresh-checkpoints"))
    assert fresh.returncode == 0 and len(METRIC_LINE.findall(fresh.stdout)) == 1, fresh.stderr[-2000:]
    plain = torch.load(tmp_path / "fresh-checkpoints" / "best.pt", weights_only=False)["model"]
    torch.testing.assert_close(plain["head.weight"], first["head.weight"])

    # A best checkpoint left by other settings never enters the average.
    stale = torch.load(ckpt / "member-2" / "best.pt", weights_only=False)
    torch.save(dict(stale, key="other settings"), ckpt / "member-2" / "best.pt")
    refused = run_entrypoint(opt_ml, env, *hp, "--soup", "2")
    assert refused.returncode == 1 and "network 2's best checkpoint" in refused.stderr, refused.stderr[-2000:]


def _probabilities(path: Path) -> dict[str, float]:
    return {Path(r["path"]).name: float(r["probability_pneumonia"]) for r in csv.DictReader(open(path))}


def test_test_time_views_are_served_as_calibrated_and_added_to_a_finished_run(tmp_path):
    opt_ml = tmp_path / "opt_ml"
    train = subset(opt_ml / "input" / "data" / "train", 24)
    env = sm_env(opt_ml, train)
    hp = ["--epochs", "1", *QUICK]
    plain = run_entrypoint(opt_ml, env, *hp, "--tta-zoom-out", "")  # no views: the network alone
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-3000:]
    assert read_bundle(opt_ml / "model").meta["onnx"]["test_time_views"] == {"hflip": False, "zoom_out": []}
    before = _probabilities(opt_ml / "output" / "data" / "val_predictions.csv")

    # Views are applied after training: the finished run is exported again, not retrained.
    views = run_entrypoint(opt_ml, env, *hp, "--tta", "true", "--tta-zoom-out", "1.2,1.5")
    assert views.returncode == 0, views.stdout[-2000:] + views.stderr[-3000:]
    assert "resumed from checkpoint at epoch 1" in views.stdout and not METRIC_LINE.search(views.stdout)
    bundle = read_bundle(opt_ml / "model")
    assert bundle.meta["onnx"]["test_time_views"] == {"hflip": True, "zoom_out": [1.2, 1.5]}
    card = (opt_ml / "model" / "report" / "MODEL_CARD.md").read_text()
    assert "its mirror image, a copy shrunk by 1.2, a copy shrunk by 1.5" in card
    calibrated = _probabilities(opt_ml / "output" / "data" / "val_predictions.csv")
    assert calibrated.keys() == before.keys()
    assert max(abs(calibrated[k] - before[k]) for k in before) > 1e-3  # the views changed the predictions

    # The serving path (ONNX Runtime through the evaluation command) gives exactly the
    # probabilities that calibration and the threshold were computed from.
    layout = tmp_path / "val"
    for r in csv.DictReader(open(opt_ml / "output" / "data" / "val_predictions.csv")):
        (layout / r["label"]).mkdir(parents=True, exist_ok=True)
        (layout / r["label"] / Path(r["path"]).name).symlink_to(opt_ml / "input" / "data" / r["path"])
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "training_job.evaluate", "--bundle", str(opt_ml / "model"),
                           "--data", str(layout), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    served = _probabilities(out / "predictions.csv")
    assert served.keys() == calibrated.keys()
    assert max(abs(served[k] - calibrated[k]) for k in served) <= 1e-4


def test_zoom_out_views_are_checked_when_the_arguments_are_read(tmp_path):
    from training_job.train import TrainingError, parse_args

    train = str(subset(tmp_path / "train", 1))
    assert parse_args(["--train", train, "--tta-zoom-out", "1.1, 1.2,1.3"]).tta_zoom_out == (1.1, 1.2, 1.3)
    assert parse_args(["--train", train, "--tta-zoom-out", ""]).tta_zoom_out == ()
    with pytest.raises(TrainingError, match="zoom-out factors must be above 1 and at most 2, got 0.9"):
        parse_args(["--train", train, "--tta-zoom-out", "1.1,0.9"])
    with pytest.raises(TrainingError, match="expected zoom-out factors such as 1.1,1.2,1.3, got 'big'"):
        parse_args(["--train", train, "--tta-zoom-out", "big"])
    assert parse_args(["--train", train, "--augment-scale", "0.7, 1.1"]).augment_scale == (0.7, 1.1)
    assert parse_args(["--train", train, "--augment-scale", "preset"]).augment_scale is None
    with pytest.raises(TrainingError, match="expected the smaller scale first, got '1.1,0.7'"):
        parse_args(["--train", train, "--augment-scale", "1.1,0.7"])
    with pytest.raises(TrainingError, match="expected scales from 0.5 to 1.5, got '0.4,1.1'"):
        parse_args(["--train", train, "--augment-scale", "0.4,1.1"])
    with pytest.raises(TrainingError, match=r"expected two scales such as 0.7,1.1 \(or preset\), got '0.7'"):
        parse_args(["--train", train, "--augment-scale", "0.7"])
