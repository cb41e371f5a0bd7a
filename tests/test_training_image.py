"""The training image: its pins are this test run's environment, its entrypoint decodes SageMaker's
hyperparameters.json as the SageMaker training toolkit does, and one epoch trains through it.

No container engine runs here (and base images cannot be pulled), so the image is checked the
other way round: CI's virtualenv is built from the same pins on the same Python minor version
as the Dockerfile installs, and the smoke test runs the image's entrypoint in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import DATA_224, ROOT

from infra.config import encode_hyperparameters, load
from infra.packaging import TRAINING_REQUIREMENTS, render_training_requirements, training_context_members
from infra.twin.training import hyperparameter_args
from shared.bundle import read_bundle
from shared.labels import CLASS_NAMES
from training_job.container import (
    decode_hyperparameters,
    to_cmd_args,
    training_environment,
    user_hyperparameters,
)

DOCKERFILE = ROOT / "training_job" / "Dockerfile"


def test_requirements_txt_is_what_pyproject_says():
    assert TRAINING_REQUIREMENTS.read_text() == render_training_requirements(), "run: python -m infra.packaging"
    names = {r.split("==")[0].lower() for r in _pins()}
    assert {"torch", "torchvision", "numpy", "onnx", "onnxruntime", "scikit-learn"} <= names


def _pins() -> list[str]:
    return [ln for ln in TRAINING_REQUIREMENTS.read_text().splitlines() if ln and not ln.startswith("#")]


def test_this_environment_is_the_image_environment():
    """The suite runs on the interpreter minor version and the exact package versions the image installs."""
    m = re.search(r"^FROM\s+\S+/python:(\d+\.\d+)-slim-\w+@sha256:[0-9a-f]{64}\s*$", DOCKERFILE.read_text(), re.M)
    assert m, "the training image builds on a python:<version>-slim base pinned by digest"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == m.group(1)
    for pin in _pins():
        name, version = pin.split("==")
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, image pins {version}"


def test_dockerfile_installs_the_pins_once_and_runs_the_entrypoint():
    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs == ["pip install --no-cache-dir --only-binary=:all: -r /tmp/requirements.txt && rm /tmp/requirements.txt"]
    copies = [src for src, _ in re.findall(r"^COPY\s+(\S+)\s+(\S+)", text, re.M)]
    assert copies == ["requirements.txt", "shared/", "training_job/"]
    assert 'ENTRYPOINT ["python", "/opt/program/training_job/container.py"]' in text
    assert "ResNet18_Weights" in text and "TORCH_HOME" in text  # pretrained weights inside, no download at run time
    rels = {rel for rel, _ in training_context_members()}
    assert {"Dockerfile", "requirements.txt", "training_job/train.py", "training_job/container.py",
            "shared/bundle.py"} <= rels
    assert not any(r.startswith(("infra/", "tests/", "inference_lambda/")) for r in rels)


@pytest.mark.parametrize(("raw", "args"), [
    # what the SDK and the state machine send: every value JSON-encoded
    ({"recipe": '"gpu"', "epochs": "10", "amp": "true", "lr": "0.001"},
     ["--amp", "True", "--epochs", "10", "--lr", "0.001", "--recipe", "gpu"]),
    # a hand-written request with raw strings: kept as they are
    ({"recipe": "gpu", "note": "two words"}, ["--note", "two words", "--recipe", "gpu"]),
    # one-letter names, mappings, and the platform's sagemaker_* names (not passed on)
    ({"b": "2", "tags": '{"y": 2, "x": 1}', "sagemaker_program": '"train.py"'}, ["-b", "2", "--tags", "x=1,y=2"]),
])
def test_hyperparameters_decode_as_the_sagemaker_training_toolkit_does(raw, args):
    assert to_cmd_args(user_hyperparameters(decode_hyperparameters(raw))) == args


def test_the_entrypoint_reads_sagemakers_booleans_and_bare_flags():
    from training_job.train import parse_args

    args = to_cmd_args(user_hyperparameters(decode_hyperparameters(
        {"tta": "true", "amp": "false", "pretrained": '"False"', "calibrate": "1"})))
    assert args == ["--amp", "False", "--calibrate", "1", "--pretrained", "False", "--tta", "True"]
    parsed = parse_args([*args, "--train", str(DATA_224 / "train")])
    assert (parsed.tta, parsed.amp, parsed.pretrained, parsed.calibrate) == (True, False, False, True)
    bare = parse_args(["--amp", "False", "--hflip", "--train", str(DATA_224 / "train")])
    assert (bare.amp, bare.hflip) == (False, True)


def test_the_stack_and_the_twin_deliver_the_same_command_line():
    config = load({"hyperparameters": json.dumps({"recipe": "gpu", "epochs": 3, "ema": True, "progress": "plain"})})
    encoded = config.training_hyperparameters()
    assert encoded == {"recipe": '"gpu"', "epochs": "3", "ema": "true", "progress": '"plain"'}
    assert encoded == encode_hyperparameters(config.hyperparameters)
    # the twin writes hyperparameters.json with the same encoding and runs the same decoding
    assert hyperparameter_args(config.hyperparameters) == ["--ema", "True", "--epochs", "3", "--progress", "plain",
                                                          "--recipe", "gpu"]


def _opt_ml(base: Path, hyperparameters: dict, per_class: int) -> Path:
    for cls in CLASS_NAMES:
        d = base / "input" / "data" / "train" / cls
        d.mkdir(parents=True)
        for src in sorted((DATA_224 / "train" / cls).iterdir())[:per_class]:
            (d / src.name).symlink_to(src)
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(encode_hyperparameters(hyperparameters)))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "File"}}))
    for sub in ("model", "output/data", "checkpoints"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def test_environment_follows_the_container_contract(tmp_path):
    base = _opt_ml(tmp_path / "opt_ml", {"epochs": 1, "sagemaker_region": "eu-west-1"}, per_class=1)
    args, env = training_environment(base, environ={}, gpus=0)
    assert args == ["--checkpoint-dir", str(base / "checkpoints"), "--epochs", "1"]
    assert env["SM_CHANNEL_TRAIN"] == str(base / "input" / "data" / "train")
    assert json.loads(env["SM_CHANNELS"]) == ["train"] and json.loads(env["SM_HOSTS"]) == ["algo-1"]
    assert env["SM_MODEL_DIR"] == str(base / "model") and env["SM_OUTPUT_DIR"] == str(base / "output")
    assert json.loads(env["SM_HPS"]) == {"epochs": 1}


@pytest.mark.slow
def test_one_epoch_through_the_image_entrypoint(tmp_path):
    """The image's smoke test: `container.py train` against an /opt/ml tree, one epoch, a valid bundle."""
    hp = {"architecture": "seed_cnn", "width": 8, "image_size": 64, "batch-size": 16, "epochs": 1,
          "progress": "plain", "workers": 1, "calibrate": False}
    base = _opt_ml(tmp_path / "opt_ml", hp, per_class=24)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "AWS_"))}
    env.pop("PYTHONPATH", None)
    env.update({"SAGEMAKER_BASE_DIR": str(base), "OMP_NUM_THREADS": "2"})
    proc = subprocess.run([sys.executable, str(ROOT / "training_job" / "container.py"), "train"], cwd=base, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"^epoch=1 train_loss=", proc.stdout + proc.stderr, re.M)
    bundle = read_bundle(base / "model")
    assert bundle.class_names == tuple(CLASS_NAMES)
    assert bundle.meta["provenance"]["hyperparameters"]["epochs"] == 1
    assert not (base / "output" / "failure").exists()


def test_entrypoint_refuses_other_commands(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "training_job" / "container.py"), "serve"],
                          env={"SAGEMAKER_BASE_DIR": str(tmp_path), "PATH": os.environ.get("PATH", "")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "expected the argument 'train'" in proc.stderr
