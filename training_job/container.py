"""The training image's entrypoint: what a SageMaker training job runs (``docker run <image> train``).

SageMaker hands a container its job through files under ``/opt/ml`` (``$SAGEMAKER_BASE_DIR``
elsewhere, e.g. in the local twin). This module reads them the way the SageMaker training toolkit
does (``sagemaker_training.environment`` and ``sagemaker_training.mapping``, aws/sagemaker-training-toolkit),
so that the image needs no toolkit and the local twin runs this same decoding:

- ``input/config/hyperparameters.json``: a JSON object of strings. Each value is ``json.loads``-ed;
  a value that is not JSON (a raw string from a hand-written request) is kept as it is. Names
  starting with ``sagemaker_`` belong to the platform and are not passed on.
- The remaining hyperparameters become the command line: names sorted, ``--name value``
  (``-n value`` for a one-letter name), a mapping as ``k=v,k2=v2`` (sorted), anything else ``str(value)``.
  JSON ``true`` therefore arrives as ``True``, which ``train.py``'s boolean options accept.
- ``input/config/resourceconfig.json`` (``current_host``, ``hosts``) and
  ``input/config/inputdataconfig.json`` (one key per channel) become ``SM_HOSTS``,
  ``SM_CURRENT_HOST``, ``SM_CHANNELS`` and ``SM_CHANNEL_<NAME>`` (= ``input/data/<name>``), beside
  ``SM_MODEL_DIR``, ``SM_OUTPUT_DIR``, ``SM_OUTPUT_DATA_DIR``, ``SM_INPUT_DIR``, ``SM_INPUT_CONFIG_DIR``,
  ``SM_NUM_GPUS`` (``nvidia-smi --list-gpus``, 0 without it), ``SM_NUM_CPUS`` and ``SM_HPS``.

Then the process becomes ``python training_job/train.py <arguments>`` (``os.execve``: the signal
SageMaker sends on a stop or spot interruption reaches the trainer directly, and its exit status
is the job's). Only standard-library imports: nothing here may fail before ``train.py`` can write
its failure file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"
PLATFORM_PREFIX = "sagemaker_"
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each value JSON-decoded where it is JSON, else kept (``sagemaker_training.environment.read_hyperparameters``).

    >>> decode_hyperparameters({"recipe": '"gpu"', "epochs": "10", "amp": "true", "name": "plain"})
    {'recipe': 'gpu', 'epochs': 10, 'amp': True, 'name': 'plain'}
    """
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            value = json.loads(value)
        except (ValueError, TypeError):
            pass
        decoded[key] = value
    return decoded


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin1")
    return str(value)


def to_cmd_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """``--name value`` pairs in sorted name order (``sagemaker_training.mapping.to_cmd_args``).

    >>> to_cmd_args({"epochs": 10, "amp": True, "lr": 0.001, "b": {"y": 2, "x": 1}})
    ['--amp', 'True', '-b', 'x=1,y=2', '--epochs', '10', '--lr', '0.001']
    """
    args: list[str] = []
    for key in sorted(hyperparameters):
        name = _text(key)
        value = hyperparameters[key]
        args.append(("--" if len(name) > 1 else "-") + name if name else "")
        if hasattr(value, "items"):
            args.append(",".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            args.append(_text(value))
    return args


def user_hyperparameters(decoded: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters the training script receives: all but the platform's ``sagemaker_*``."""
    return {k: v for k, v in decoded.items() if not str(k).startswith(PLATFORM_PREFIX)}


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def num_gpus() -> int:
    """GPUs visible to the container, counted as the toolkit does (``nvidia-smi --list-gpus``)."""
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def training_environment(base_dir: Path, environ: Mapping[str, str] | None = None,
                         gpus: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``(train.py arguments, environment)`` for the job described under ``base_dir``."""
    env = dict(os.environ if environ is None else environ)
    config_dir = base_dir / "input" / "config"
    decoded = decode_hyperparameters(_read_json(config_dir / "hyperparameters.json", {}))
    user = user_hyperparameters(decoded)
    resources = _read_json(config_dir / "resourceconfig.json", {})
    channels = sorted(_read_json(config_dir / "inputdataconfig.json", {}))
    hosts = resources.get("hosts") or ["algo-1"]
    env.update({
        "SM_MODEL_DIR": str(base_dir / "model"),
        "SM_OUTPUT_DIR": str(base_dir / "output"),
        "SM_OUTPUT_DATA_DIR": str(base_dir / "output" / "data"),
        "SM_INPUT_DIR": str(base_dir / "input"),
        "SM_INPUT_CONFIG_DIR": str(config_dir),
        "SM_HOSTS": json.dumps(sorted(hosts)),
        "SM_CURRENT_HOST": resources.get("current_host") or hosts[0],
        "SM_NUM_GPUS": str(num_gpus() if gpus is None else gpus),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_CHANNELS": json.dumps(channels),
        "SM_HPS": json.dumps(user, sort_keys=True, separators=(",", ":"), ensure_ascii=True),
        "PYTHONUNBUFFERED": "1",
    })
    for channel in channels:
        env[f"SM_CHANNEL_{channel.upper()}"] = str(base_dir / "input" / "data" / channel)
    args = to_cmd_args(user)
    if str(base_dir) != DEFAULT_BASE_DIR:
        # train.py's default checkpoint folder is /opt/ml/checkpoints; elsewhere it is the base's.
        args = ["--checkpoint-dir", str(base_dir / "checkpoints"), *args]
    return args, env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["train"]:
        print(f"this image runs SageMaker training jobs: expected the argument 'train', got {argv!r}",
              file=sys.stderr)
        return 2
    base_dir = Path(os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR)
    args, env = training_environment(base_dir)
    # train.py puts the folder above training_job/ on sys.path itself, so shared/ imports as run here.
    os.execve(sys.executable, [sys.executable, str(TRAIN_SCRIPT), *args], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
