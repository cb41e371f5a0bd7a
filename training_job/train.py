"""Train a NORMAL-vs-PNEUMONIA classifier and write a model bundle.

The training image runs this file as ``python training_job/train.py --key value ...`` (SageMaker's
hyperparameters); the same command runs on a laptop with plain paths::

    python -m training_job.train --data ../shared/data/chest_xray_224 --epochs 2

Laid out as torchvision's classification reference is: this file holds the arguments, the
SageMaker contract, the process launch and checkpoint resumption, and reads top to bottom:
arguments -> data (``data.prepare_data``: decode once, split by patient) -> model (``models``) ->
epochs (``engine.train_one_epoch`` and ``engine.evaluate``; a metric line each, checkpoints) ->
outputs (``export.write_outputs``: best checkpoint, temperature and threshold on validation,
report, out-of-distribution check, ONNX export checked against torch, bundle). Any failure writes
a one-line reason to ``/opt/ml/output/failure`` (SageMaker shows it as the job's FailureReason)
and exits non-zero, with no bundle left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script inside SageMaker's source directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "training_job"

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shared.cli import HelpFormatter, add_bool, shown_default
from shared.dataset import MIN_VAL_PER_CLASS, VAL_FRACTION, DatasetLayoutError
from shared.imaging import ImageError
from shared.labels import CLASS_NAMES
from shared.preprocessing import PreprocessSpec
from training_job import data as D
from training_job import engine as E
from training_job.export import ExportError, utc_now, write_outputs
from training_job.metrics import THRESHOLD_POLICIES
from training_job.models import (
    ARCHITECTURES,
    PRETRAINED,
    build_model,
    check_pretrained,
    check_zoom_out,
    input_normalization,
    pretrained_provenance,
)
from training_job.recipes import RECIPES

CHECKPOINT_VERSION = 1


class TrainingError(Exception):
    """A problem with the input or the request: reported to the user as is, no traceback."""


# ---------------------------------------------------------------- arguments and environment


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit(2) with usage; we need the failure file too
        raise TrainingError(f"bad hyperparameters: {message}")


def _env_path(name: str, fallback: str | None) -> str | None:
    return os.environ.get(name) or fallback


def _recipe_defaults(parser: argparse.ArgumentParser) -> None:
    """State in each help line the default the default recipe gives, and what the other recipes change."""
    default_recipe = parser.get_default("recipe")
    for action in parser._actions:
        if not any(action.dest in r for r in RECIPES.values()):
            continue
        values = {name: r.get(action.dest, action.default) for name, r in RECIPES.items()}
        base = values[default_recipe]
        others = ", ".join(f"{name}: {shown_default(v)}" for name, v in values.items() if v != base)
        action.help = (f"{action.help} " if action.help else "") + (
            f"(default: {shown_default(base)}" + (f"; --recipe {others}" if others else "") + ")")


def _comma_list(text: str) -> list[str]:
    """``"1.1, 1.2,1.3"`` -> ``["1.1", "1.2", "1.3"]``; empty items dropped."""
    return [p for p in str(text).replace(" ", "").split(",") if p]


def zoom_factors(text: str) -> tuple[float, ...]:
    """``--tta-zoom-out``'s value: ``"1.1,1.2,1.3"`` -> ``(1.1, 1.2, 1.3)``; ``""`` -> ``()``.

    Raises ``argparse.ArgumentTypeError`` (a one-line "bad hyperparameters" error) for anything
    but numbers above 1 and at most 2 (:func:`training_job.models.check_zoom_out`)."""
    try:
        zs = tuple(float(p) for p in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected zoom-out factors such as 1.1,1.2,1.3, got {text!r}") from None
    try:
        check_zoom_out(zs)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return zs


PRESET_SCALE = "preset"  # --augment-scale's word for "the augmentation preset's own range"


def scale_range(text: str) -> tuple[float, float] | None:
    """``--augment-scale``'s value: ``"0.7,1.1"`` -> ``(0.7, 1.1)``; ``"preset"`` -> None (the
    augmentation preset's own range, :meth:`training_job.data.Augment.preset`).

    Raises ``argparse.ArgumentTypeError`` (a one-line "bad hyperparameters" error) unless it is
    ``preset`` or two numbers, the first no larger than the second, both within
    :data:`training_job.data.AUGMENT_SCALE_RANGE`."""
    if str(text).strip().lower() == PRESET_SCALE:
        return None
    lo_ok, hi_ok = D.AUGMENT_SCALE_RANGE
    try:
        lo, hi = (float(p) for p in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two scales such as 0.7,1.1 (or {PRESET_SCALE}), "
                                         f"got {text!r}") from None
    if not (lo_ok <= lo <= hi_ok and lo_ok <= hi <= hi_ok):
        raise argparse.ArgumentTypeError(f"expected scales from {lo_ok:g} to {hi_ok:g}, got {text!r}")
    if lo > hi:
        raise argparse.ArgumentTypeError(f"expected the smaller scale first, got {text!r}")
    return lo, hi


def make_augment(args: argparse.Namespace) -> D.Augment | None:
    """The training augmentation the hyperparameters ask for: ``--augment``'s preset (None for
    ``none``) with ``--hflip`` and ``--augment-scale`` applied to it."""
    augment = D.Augment.preset(args.augment)
    if augment is not None and args.hflip:
        augment = dataclasses.replace(augment, hflip=True)
    if augment is not None and args.augment_scale is not None:
        augment = dataclasses.replace(augment, scale=(float(args.augment_scale[0]), float(args.augment_scale[1])))
    return augment


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training_job.train", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=HelpFormatter,
                epilog="SageMaker runs this file with every hyperparameter as --key value; snake_case "
                       "names (--image_size) are accepted as well as kebab-case ones (--image-size).")
    io = p.add_argument_group("data and outputs (SageMaker sets these through SM_* variables)")
    io.add_argument("--data", help="a dataset root holding train/ and optionally val/ (Kaggle chest_xray layout); "
                                   "an alternative to --train/--val")
    io.add_argument("--train", default=_env_path("SM_CHANNEL_TRAIN", None),
                    help="folder with NORMAL/ and PNEUMONIA/ images to train on (default: $SM_CHANNEL_TRAIN, "
                         "SageMaker's 'train' input channel, else train/ under --data)")
    io.add_argument("--val", default=_env_path("SM_CHANNEL_VAL", None),
                    help="folder with NORMAL/ and PNEUMONIA/ images to validate on (default: $SM_CHANNEL_VAL, "
                         "SageMaker's 'val' input channel, else val/ under --data, else split off --train)")
    io.add_argument("--model-dir", default=_env_path("SM_MODEL_DIR", "runs/model"), help="where the bundle is written")
    io.add_argument("--output-data-dir", default=_env_path("SM_OUTPUT_DATA_DIR", "runs/output/data"),
                    help="logs, per-image validation predictions, history")
    io.add_argument("--checkpoint-dir", default="/opt/ml/checkpoints" if Path("/opt/ml").is_dir() else "runs/checkpoints",
                    help="resumable checkpoints (SageMaker syncs /opt/ml/checkpoints to S3)")

    m = p.add_argument_group("model")
    m.add_argument("--architecture", default="resnet10", choices=ARCHITECTURES, help="network")
    m.add_argument("--width", type=int, default=32, help="first-stage channels of seed_cnn/resnet10; 0 = the architecture's default")
    m.add_argument("--dropout", type=float, default=0.1, help="dropout before the classifier")
    add_bool(m, "--pretrained", default=False,
             help="start from ImageNet weights: for efficientnet_lite0 the packaged ones (offline), for "
                  "resnet18/34 torchvision's (downloaded: the job needs internet)")
    m.add_argument("--image-size", type=int, help="network input side in px")
    m.add_argument("--channels", type=int, default=1, choices=(1, 3), help="input channels: 1 grey, 3 grey repeated")
    m.add_argument("--resize", default="stretch", choices=("stretch", "letterbox", "center_crop"),
                   help="how an image becomes a square network input")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    t.add_argument("--batch-size", type=int, default=64, help="images per step, per process")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adam"), help="optimizer")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    t.add_argument("--scheduler", default="onecycle", choices=("onecycle", "cosine", "none"),
                   help="learning-rate schedule")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="cosine schedule warm-up")
    t.add_argument("--label-smoothing", type=float, default=0.05, help="label smoothing of the cross-entropy loss")
    t.add_argument("--class-weighting", default="balanced", choices=("balanced", "none"),
                   help="weight the loss by inverse class frequency")
    t.add_argument("--augment", default="medium", choices=("none", "light", "medium", "strong", "acquisition"),
                   help="augmentation preset (training_job/data.py: Augment.preset)")
    t.add_argument("--augment-scale", type=scale_range, default=PRESET_SCALE, metavar="LO,HI",
                   help="range of the image's side relative to the frame that the preset's random scale draws "
                        f"from (below 1 shrinks the image, borders replicated), or {PRESET_SCALE} for the preset's "
                        "own; a recipe's range belongs to the recipe's preset, so another --augment keeps its own "
                        "unless this is given; no effect with --augment none")
    t.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha) parameter; 0 = off")
    add_bool(t, "--hflip", default=False, help="random horizontal flips (anatomy is asymmetric)")
    t.add_argument("--ema-decay", type=float, default=0.0, help="exponential moving average of weights, decay warmed up as min(d, (1+n)/(10+n)) over n updates; 0 = off")
    t.add_argument("--linear-probe-c", type=float, default=0.0,
                   help="LP-FT: before fine-tuning, fit the head as a logistic regression on the frozen pretrained "
                        "features with this inverse L2 strength (scikit-learn's C); 0 = a random head. Needs --pretrained")
    t.add_argument("--wise-alpha", type=float, default=1.0,
                   help="WiSE-FT: export (1 - WISE_ALPHA) x the weights training started from + WISE_ALPHA x the "
                        "fine-tuned ones; 1 = the fine-tuned weights as they are. Needs --linear-probe-c. Changing "
                        "it keeps the checkpoints, so a finished run can be exported again with another value")
    t.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="discriminative fine-tuning: every layer but the classifier head learns at LR x this "
                        "(0 < scale <= 1; 1 = one learning rate); the logged lr stays the head's. Needs --pretrained")
    t.add_argument("--soup", type=int, default=1,
                   help="uniform model soup (Wortsman et al. 2022): fine-tune this many networks from the same "
                        "pretrained weights on the same split, with seeds SEED, SEED+1, ..., and export the average "
                        "of their weights: one network's size and speed. 1 = one network. Needs --pretrained")
    add_bool(t, "--tta", default=False,
             help="test-time views: also average the logits over the mirrored image (anatomy is asymmetric). Like "
                  "--tta-zoom-out it is part of the exported model, so calibration, the threshold and serving see it; "
                  "the best epoch is chosen on the network alone")
    t.add_argument("--tta-zoom-out", type=zoom_factors, default=(), metavar="Z1,Z2,...",
                   help="test-time views: also average the logits over copies of the image shrunk by each factor "
                        "(above 1, at most 2) in the middle of the frame, borders replicated; '' = none")
    add_bool(t, "--amp", default=True, help="mixed precision (CUDA only)")
    t.add_argument("--seed", type=int, default=42, help="random seed (split, initial weights, augmentation)")

    v = p.add_argument_group("validation, calibration, decision")
    v.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="patient-grouped split when no val channel")
    v.add_argument("--min-val-per-class", type=int, default=MIN_VAL_PER_CLASS,
                   help="a val channel smaller than this per class is merged into train and re-split by patient")
    v.add_argument("--threshold-policy", default="youden", choices=THRESHOLD_POLICIES,
                   help="how validation chooses the decision threshold: youden (maximise Youden's J), sensitivity "
                        "(the highest threshold reaching --target-sensitivity), balanced (0.5 on the calibrated "
                        "probability of the class-balanced model, independent of the validation prevalence)")
    v.add_argument("--target-sensitivity", type=float, default=0.0,
                   help="choose the threshold reaching this validation sensitivity; 0 = maximise Youden's J")
    add_bool(v, "--calibrate", default=True, help="fit a softmax temperature on validation")
    v.add_argument("--select-metric", default="roc_auc", choices=("roc_auc", "loss", "accuracy"),
                   help="the validation figure that chooses the best epoch (ties: the lower validation loss)")

    r = p.add_argument_group("run")
    r.add_argument("--recipe", default="cpu", choices=tuple(RECIPES),
                   help="a named set of defaults (training_job/recipes.py); other flags override it")
    r.add_argument("--limit-per-class", type=int, default=0,
                   help="use at most this many images per class (quick runs); 0 = all")
    r.add_argument("--workers", type=int, default=4, help="decoding threads")
    r.add_argument("--processes-per-host", type=int, default=0,
                   help="DDP processes per host; 0 = one per GPU (SM_NUM_GPUS), else one")
    r.add_argument("--progress", default="auto", choices=("auto", "bar", "plain"),
                   help="progress display: a bar, plain lines (logs), or auto (a bar on a terminal)")
    _recipe_defaults(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    # SageMaker passes hyperparameters as they were named; accept snake_case and kebab-case alike.
    norm = []
    for tok in argv:
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            tok = "--" + key.replace("_", "-") + eq + val
        norm.append(tok)
    parser = build_parser()
    recipe, _ = parser.parse_known_args(norm)
    parser.set_defaults(**RECIPES[recipe.recipe])
    recipe_preset = parser.get_default("augment")
    args = parser.parse_args(norm)
    given = {tok.partition("=")[0] for tok in norm if tok.startswith("--")}
    if args.augment != recipe_preset and "--augment-scale" not in given:
        args.augment_scale = None  # the recipe's scale range was chosen with its preset; another keeps its own
    if args.pretrained and "--pretrained" not in given and args.architecture not in PRETRAINED:
        args.pretrained = False  # the recipe's weights belong to its own architecture, not to an override
    if args.soup > 1 and "--soup" not in given and (not args.pretrained or args.wise_alpha < 1):
        args.soup = 1  # the recipe's soup applies where one can be made: pretrained weights, no WiSE-FT
    try:
        check_args(args)
    except TrainingError as exc:
        exc.namespace = args  # the folders the run was given: main() reports the failure there
        raise
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot make a model (:class:`TrainingError`, one line a user can act on)
    before any data is read; fills in the training and validation channels from ``--data``."""
    if args.pretrained:
        try:
            check_pretrained(args.architecture)
        except ValueError as exc:
            raise TrainingError(f"{exc} or --pretrained false") from None
    if args.epochs < 1:
        raise TrainingError(f"epochs must be at least 1 (got {args.epochs}): a zero-epoch run cannot produce a model")
    if args.batch_size < 2:
        raise TrainingError("batch-size must be at least 2 (batch normalisation needs it)")
    if not args.lr > 0:
        raise TrainingError("lr must be positive")
    if not 0 <= args.target_sensitivity < 1:
        raise TrainingError("target-sensitivity must be in [0, 1)")
    if args.target_sensitivity > 0 and args.threshold_policy == "youden":
        args.threshold_policy = "sensitivity"  # a target sensitivity names its policy
    if not args.linear_probe_c >= 0:
        raise TrainingError("linear-probe-c must be positive, or 0 for no linear probe")
    if not 0 < args.wise_alpha <= 1:
        raise TrainingError("wise-alpha must be in (0, 1]: the share of the fine-tuned weights in the exported model")
    if not args.pretrained and (args.linear_probe_c > 0 or args.wise_alpha < 1):
        raise TrainingError("linear-probe-c and wise-alpha start from or return toward pretrained weights: "
                            "they need --pretrained")
    if not 0 < args.backbone_lr_scale <= 1:
        raise TrainingError("backbone-lr-scale must be in (0, 1]: the backbone's share of the learning rate")
    if args.backbone_lr_scale < 1 and not args.pretrained:
        raise TrainingError("backbone-lr-scale below 1 slows the pretrained layers: it needs --pretrained")
    if args.soup < 1:
        raise TrainingError("soup must be at least 1: the number of networks whose weights are averaged")
    if args.soup > 1 and not args.pretrained:
        raise TrainingError("soup above 1 averages networks fine-tuned from the same pretrained weights: it needs "
                            f"--pretrained and one of {', '.join(PRETRAINED)} (networks trained from different "
                            "random weights do not average)")
    if args.soup > 1 and args.wise_alpha < 1:
        raise TrainingError("wise-alpha and soup each choose the exported weights: use one of them")
    if args.wise_alpha < 1 and not args.linear_probe_c > 0:
        raise TrainingError("wise-alpha below 1 needs --linear-probe-c: without a probed head the weights training "
                            "started from end in a random classifier, and an average with it means nothing")
    if args.threshold_policy == "sensitivity" and not args.target_sensitivity > 0:
        raise TrainingError("threshold-policy sensitivity needs --target-sensitivity between 0 and 1")
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise TrainingError(f"dataset folder {root} does not exist")
        args.train = args.train if args.train and not os.environ.get("SM_CHANNEL_TRAIN") else str(root / "train")
        if not args.val and (root / "val").is_dir():
            args.val = str(root / "val")
    if not args.train:
        raise TrainingError("no training data: give --data DATASET_ROOT or --train CHANNEL_DIR (SageMaker: the 'train' channel)")
    if not Path(args.train).is_dir():
        raise TrainingError(f"train channel {args.train} does not exist (is the 'train' channel configured?)")
    if args.val and not Path(args.val).is_dir():
        raise TrainingError(f"val channel {args.val} does not exist")


def failure_file(args_or_none) -> Path | None:
    """Where a failed run writes its one-line reason: SageMaker's ``failure`` file, else beside the
    output data folder. ``None`` when the arguments could not be read outside SageMaker: the folder the
    user meant is unknown, and a default one may hold another run's files."""
    if os.environ.get("SM_OUTPUT_DIR"):
        return Path(os.environ["SM_OUTPUT_DIR"]) / "failure"
    if Path("/opt/ml/output").is_dir():
        return Path("/opt/ml/output/failure")
    out = getattr(args_or_none, "output_data_dir", None) or os.environ.get("SM_OUTPUT_DATA_DIR")
    return Path(out).parent / "failure" if out else None


# ---------------------------------------------------------------- processes


class Dist:
    """Where this process sits in a DDP job (world of 1 when not distributed)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def plan_processes(args) -> tuple[list[str], int, int]:
    hosts = json.loads(os.environ.get("SM_HOSTS", "[]")) or [os.environ.get("SM_CURRENT_HOST", "localhost")]
    current = os.environ.get("SM_CURRENT_HOST", hosts[0])
    gpus = int(os.environ.get("SM_NUM_GPUS", torch.cuda.device_count() if torch.cuda.is_available() else 0) or 0)
    per_host = args.processes_per_host or max(1, gpus)
    return hosts, hosts.index(current) if current in hosts else 0, per_host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Log:
    """Plain lines (SageMaker parses them) unless a person watches a terminal."""

    def __init__(self, enabled: bool, mode: str):
        self.enabled = enabled
        self.bars = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def progress(self, it, **kw):
        if not self.bars:
            return it
        from tqdm import tqdm

        return tqdm(it, leave=False, dynamic_ncols=True, **kw)


def checkpoint_key(args, info: dict, member: int = 0) -> str:
    """What must match for a checkpoint to be resumed: the data and every training choice.

    ``member`` is the network's index in a model soup (0 for the first or only one). The soup's
    size is not part of the key: the first network of a soup is the run without one, and a larger
    soup reuses the networks a smaller one trained."""
    skip = {"checkpoint_dir", "model_dir", "output_data_dir", "progress", "workers", "train", "val", "data",
            "wise_alpha", "soup", "tta_zoom_out"}  # applied after training, to the checkpoints
    hp = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    # Test-time views are applied after training too (the best epoch is chosen on the network
    # alone); --tta stays in the key at false so that earlier runs' checkpoints keep their key.
    hp["tta"] = False
    if hp.get("backbone_lr_scale") == 1.0:  # at its default it leaves the key of runs from before it existed
        del hp["backbone_lr_scale"]
    if hp.get("augment_scale") is None or hp.get("augment") == "none":  # likewise; and unused without augmentation
        hp.pop("augment_scale", None)
    parts = [hp, info["fingerprint"]] + ([member] if member else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def member_dir(checkpoint_dir: str | Path, member: int) -> Path:
    """Where network ``member`` (0-based) of a model soup keeps its checkpoints: the first in the
    checkpoint folder itself, as a run without a soup does, the others in ``member-2/``, ``member-3/``..."""
    return Path(checkpoint_dir) / (f"member-{member + 1}" if member else "")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(args, dist_info: Dist) -> Path | None:
    started = utc_now()
    log = Log(dist_info.main, args.progress)
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    mean, std = input_normalization(args.architecture, args.pretrained)
    spec = PreprocessSpec(size=args.image_size, channels=args.channels, resize=args.resize, mean=mean, std=std)

    t0 = time.time()
    train, val, info = D.prepare_data(args, spec, log)
    log(f"data: train {info['counts']['train']}, val {info['counts']['val']} ({info['val_source']}); "
        f"decoded once in {time.time() - t0:.1f}s")

    members: list[tuple[Path, list[dict], dict]] = []  # each network's best checkpoint, history, best row
    for member in range(args.soup):
        if args.soup > 1:
            log(f"model soup: network {member + 1} of {args.soup} (seed {args.seed + member})")
        if member:  # the first network draws from the generators as a run without a soup does
            seed_everything(args.seed + member)
        model, *rest = train_member(args, member, train, val, spec, info, device, dist_info, log)
        members.append(tuple(rest))

    if not dist_info.main:
        return None
    info["initial_weights"] = pretrained_provenance(args.architecture, args.pretrained)  # once per run, not per network
    best_path, history, best = members[-1]
    export_path = best_path
    if args.soup > 1:
        for i, (_, _, b) in enumerate(members):
            log(f"model soup: network {i + 1}'s best epoch {b['epoch']}, validation ROC AUC {b['val_auc']:.4f}")
        export_path = soup_checkpoint([m[0] for m in members],
                                      [checkpoint_key(args, info, i) for i in range(args.soup)],
                                      Path(args.checkpoint_dir), log)
        history = [{**row, "member": i + 1} for i, m in enumerate(members) for row in m[1]]
        best = {"epoch": [m[2]["epoch"] for m in members]}
    elif args.wise_alpha < 1:
        export_path = interpolated_checkpoint(args, member_dir(args.checkpoint_dir, 0) / "initial.pt", best_path,
                                              checkpoint_key(args, info), train, spec, device, log)
    return write_outputs(args, spec, model, export_path, val, info, history, best, started, device, log, train)


def train_member(args, member: int, train: D.Split, val: D.Split, spec: PreprocessSpec, info: dict, device,
                 dist_info: Dist, log) -> tuple[nn.Module, Path, list[dict], dict]:
    """Train network ``member`` (0-based; a run without a soup trains network 0 only), resuming
    from its own checkpoints where they match. Every network starts from the same pretrained
    weights; the classifier head, batch order and augmentation draw from the seed in force.
    Returns the model, its best checkpoint's path, its history (one row per epoch) and its best
    epoch's row (``epoch``, ``val_auc``, ``val_loss``, ``val_acc``)."""
    seed = args.seed + member
    try:
        model = build_model(args.architecture, args.channels, len(CLASS_NAMES), args.width, args.dropout, args.pretrained,
                            args.image_size)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = E.make_optimizer(args, model)
    per_rank = math.ceil(len(train) / dist_info.world)
    steps_per_epoch = max(1, per_rank // args.batch_size)
    scheduler = E.make_schedule(args, optimizer, steps_per_epoch)
    ema = None
    if args.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=E.ema_update_fn(args.ema_decay), use_buffers=True)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = E.make_loss(args, train, device)
    augment = make_augment(args)

    ckpt_dir = member_dir(args.checkpoint_dir, member)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key = checkpoint_key(args, info, member)
    history: list[dict] = []
    best: dict = {"epoch": 0}
    start_epoch = 1
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    # Rank 0 reads the checkpoint and hands it to every process: on several hosts only the
    # first one writes /opt/ml/checkpoints, and all must resume with the same weights and moments.
    state = None
    if dist_info.main and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
    if dist_info.world > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None:
        if state.get("key") == key and state.get("version") == CHECKPOINT_VERSION:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            history, best = state["history"], state["best"]
            start_epoch = state["epoch"] + 1
            torch.set_rng_state(state["rng_cpu"])
            log(f"resumed from checkpoint at epoch {state['epoch']} (best so far: epoch {best['epoch']})")
        else:
            log("checkpoint found but made with other data or settings; starting afresh")

    initial_path = ckpt_dir / "initial.pt"
    if dist_info.main and start_epoch == 1 and args.linear_probe_c > 0:
        # DDP's constructor below hands rank 0's weights, the probed head included, to every process.
        lp = E.fit_linear_probe(model, train, spec, device, args.linear_probe_c, args.class_weighting == "balanced")
        log(f"linear probe (C={lp['c']:g}) on the frozen pretrained features: training accuracy "
            f"{lp['train_accuracy']:.4f} in {lp['seconds']:.1f}s")
        save_checkpoint(initial_path, {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "key": key})

    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist_info.world > 1 else model
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(start_epoch, args.epochs + 1):
        gen.manual_seed(seed * 1000 + epoch)  # same batches whether resumed or not
        perm = torch.randperm(len(train), generator=gen)
        mine = perm[dist_info.rank::dist_info.world][: steps_per_epoch * args.batch_size]
        batches = [mine[b * args.batch_size:(b + 1) * args.batch_size] for b in range(steps_per_epoch)]
        t_epoch = time.time()
        total, count = E.train_one_epoch(
            model, ddp_model, train, spec, optimizer, scheduler, scaler, criterion, augment, ema, batches, device,
            use_amp, gen, args.mixup, progress=functools.partial(log.progress, desc=f"epoch {epoch}/{args.epochs}", unit="batch"))
        train_loss = total / max(1, count)
        if dist_info.world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            train_loss = float(t[0] / t[1].clamp_min(1))

        if dist_info.main:
            eval_model = ema.module if ema is not None else model
            ev = E.evaluate(eval_model, val, spec, device)  # the network alone: views are added at export
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": ev["val_loss"], "val_auc": ev["val_auc"],
                   "val_acc": ev["val_acc"], "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t_epoch}
            history.append(row)
            # The metric line SageMaker's MetricDefinitions parse: keep its format stable.
            print(f"epoch={epoch} train_loss={train_loss:.4f} val_loss={row['val_loss']:.4f} val_auc={row['val_auc']:.4f} "
                  f"val_acc={row['val_acc']:.4f} lr={row['lr']:.3e}", flush=True)
            if E.is_better(row, best, args.select_metric):
                best = {k: row[k] for k in ("epoch", "val_auc", "val_loss", "val_acc")}
                save_checkpoint(best_path, {"model": eval_model.state_dict(), "epoch": epoch, "key": key})
            save_checkpoint(last_path, {
                "version": CHECKPOINT_VERSION, "key": key, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "history": history, "best": best,
                "rng_cpu": torch.get_rng_state(),
            })
        dist_info.barrier()

    return model, best_path, history, best


def soup_checkpoint(best_paths: list[Path], keys: list[str], checkpoint_dir: Path, log) -> Path:
    """Average the networks' best checkpoints into ``soup.pt`` (:func:`engine.average_weights`).

    ``keys[i]`` is network i's :func:`checkpoint_key`; a best checkpoint made with other data or
    settings (a stale file, say, from a partial sync) raises :class:`TrainingError` rather than
    entering the average. Batch-norm statistics are averaged with the weights, as the model soups
    paper does. Returns the path of ``soup.pt``."""
    states = []
    for i, (path, key) in enumerate(zip(best_paths, keys, strict=True)):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") != key:
            raise TrainingError(f"model soup: network {i + 1}'s best checkpoint {path} was made with other data or "
                                "settings; remove it to train that network again")
        states.append(state)
    path = checkpoint_dir / "soup.pt"
    save_checkpoint(path, {"model": E.average_weights([st["model"] for st in states]),
                           "epoch": [st.get("epoch") for st in states]})
    log(f"model soup: exporting the average of {len(states)} networks' weights")
    return path


def interpolated_checkpoint(args, initial_path: Path, best_path: Path, key: str, train: D.Split,
                            spec: PreprocessSpec, device, log) -> Path:
    """WiSE-FT (``--wise-alpha``): the best checkpoint averaged with the weights training started from.

    Those are kept in ``initial.pt`` beside the checkpoints. Where it is missing (removed, or not
    synced back with the checkpoints) they are built again: the pretrained weights and the same
    linear probe, which is deterministic on the same images (``--wise-alpha`` below 1 requires
    ``--linear-probe-c``). Returns the interpolated checkpoint's path."""
    initial = torch.load(initial_path, map_location="cpu", weights_only=False) if initial_path.is_file() else None
    if initial is None or initial.get("key") != key:
        fresh = build_model(args.architecture, args.channels, len(CLASS_NAMES), args.width, args.dropout, True,
                            args.image_size).to(device)
        E.fit_linear_probe(fresh, train, spec, device, args.linear_probe_c, args.class_weighting == "balanced")
        initial = {"model": {k: v.cpu() for k, v in fresh.state_dict().items()}, "key": key}
        save_checkpoint(initial_path, initial)
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    final = E.plain_state_dict(best["model"])
    path = best_path.with_name("interpolated.pt")
    save_checkpoint(path, {"model": E.interpolate_weights(initial["model"], final, args.wise_alpha),
                           "epoch": best.get("epoch"), "key": key})
    log(f"WiSE-FT: exporting {1 - args.wise_alpha:g} x the initial weights + {args.wise_alpha:g} x epoch "
        f"{best.get('epoch')}'s")
    return path


def _worker(local_rank: int, args, hosts: list[str], node_rank: int, per_host: int, port: int) -> None:
    world = len(hosts) * per_host
    rank = node_rank * per_host + local_rank
    os.environ.setdefault("MASTER_ADDR", hosts[0] if len(hosts) > 1 else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_host))
        run(args, Dist(rank, world, local_rank))
    finally:
        dist.destroy_process_group()


def clear_previous_bundle(model_dir: Path) -> None:
    """A bundle left by an earlier run must not pass for this run's if this one fails."""
    from shared.bundle import BUNDLE_JSON, MODEL_FILE, REPORT_DIR

    if (model_dir / BUNDLE_JSON).is_file():
        (model_dir / BUNDLE_JSON).unlink()
        (model_dir / MODEL_FILE).unlink(missing_ok=True)
        shutil.rmtree(model_dir / REPORT_DIR, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        fail = failure_file(args)
        if fail and fail.exists():
            fail.unlink()
        clear_previous_bundle(Path(args.model_dir))
        hosts, node_rank, per_host = plan_processes(args)
        if os.environ.get("WORLD_SIZE") and int(os.environ["WORLD_SIZE"]) > 1:  # launched by torchrun
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            try:
                run(args, Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))))
            finally:
                dist.destroy_process_group()
        elif len(hosts) * per_host > 1:
            port = 29500 if len(hosts) > 1 else _free_port()
            torch.multiprocessing.spawn(_worker, args=(args, hosts, node_rank, per_host, port), nprocs=per_host)
        else:
            run(args, Dist())
        return 0
    except (TrainingError, ImageError, DatasetLayoutError, ExportError) as exc:
        reason = str(exc)
        args = args or getattr(exc, "namespace", None)
    except torch.multiprocessing.ProcessRaisedException as exc:
        text = str(exc).strip().splitlines()
        reason = next((ln for ln in reversed(text) if "Error" in ln), text[-1] if text else "a training process failed")
    except KeyboardInterrupt:
        reason = "interrupted"
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log for whoever fixes it
        traceback.print_exc()
        reason = f"internal error: {type(exc).__name__}: {exc}"
    print(f"training failed: {reason}", file=sys.stderr, flush=True)
    # No bundle is left where this run was to write one. When the arguments could not be read, only
    # SageMaker's own folders are known; a local default folder may hold another run's model.
    model_dir = getattr(args, "model_dir", None) or os.environ.get("SM_MODEL_DIR")
    fail = failure_file(args)
    with contextlib.suppress(OSError):
        if model_dir:
            clear_previous_bundle(Path(model_dir))
    with contextlib.suppress(OSError):
        if fail:
            fail.parent.mkdir(parents=True, exist_ok=True)
            fail.write_text(reason[:1000] + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
