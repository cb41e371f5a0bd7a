"""Train a NORMAL-vs-PNEUMONIA classifier and write a model bundle.

The SageMaker PyTorch container runs this file as ``python training_job/train.py --key value ...``
(contract 2); the same command runs on a laptop with plain paths::

    python -m training_job.train --data ../shared/data/chest_xray_224 --epochs 2

Read top to bottom: arguments -> data (decode once, split by patient) -> model -> epochs
(metric line each, checkpoints) -> best checkpoint -> temperature and threshold on validation ->
report -> ONNX export checked against torch -> bundle. Any failure writes a one-line reason to
``/opt/ml/output/failure`` (SageMaker shows it as the job's FailureReason) and exits non-zero,
with no bundle left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
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
import torch.nn.functional as F
from torch import nn

from shared.dataset import DatasetLayoutError, fingerprint
from shared.imaging import ImageError
from shared.labels import CLASS_NAMES, POSITIVE_INDEX
from shared.preprocessing import PreprocessSpec, normalize
from training_job import data as D
from training_job.export import ExportError, write_model_bundle
from training_job.metrics import choose_threshold, fit_temperature, metrics_at_threshold
from training_job.models import ARCHITECTURES, build_model
from training_job.ood import fit_ood
from training_job.recipes import RECIPES
from training_job.report import write_json, write_report

CHECKPOINT_VERSION = 1


class TrainingError(Exception):
    """A problem with the input or the request: reported to the user as is, no traceback."""


# ---------------------------------------------------------------- arguments and environment


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit(2) with usage; we need the failure file too
        raise TrainingError(f"bad hyperparameters: {message}")


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _env_path(name: str, fallback: str | None) -> str | None:
    return os.environ.get(name) or fallback


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs (SageMaker sets these through SM_* variables)")
    io.add_argument("--data", help="a dataset root holding train/ and optionally val/ (Kaggle chest_xray layout); "
                                   "an alternative to --train/--val")
    io.add_argument("--train", default=_env_path("SM_CHANNEL_TRAIN", None), help="train channel: NORMAL/ and PNEUMONIA/ folders")
    io.add_argument("--val", default=_env_path("SM_CHANNEL_VAL", None), help="optional validation channel")
    io.add_argument("--model-dir", default=_env_path("SM_MODEL_DIR", "runs/model"), help="where the bundle is written")
    io.add_argument("--output-data-dir", default=_env_path("SM_OUTPUT_DATA_DIR", "runs/output/data"),
                    help="logs, per-image validation predictions, history")
    io.add_argument("--checkpoint-dir", default="/opt/ml/checkpoints" if Path("/opt/ml").is_dir() else "runs/checkpoints",
                    help="resumable checkpoints (SageMaker syncs /opt/ml/checkpoints to S3)")

    m = p.add_argument_group("model")
    m.add_argument("--architecture", default="resnet10", choices=ARCHITECTURES)
    m.add_argument("--width", type=int, default=32, help="first-stage channels of seed_cnn/resnet10; 0 = the architecture's default")
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--pretrained", type=_bool, default=False, help="ImageNet weights (downloads; needs internet)")
    m.add_argument("--image-size", type=int, default=160)
    m.add_argument("--channels", type=int, default=1, choices=(1, 3))
    m.add_argument("--resize", default="stretch", choices=("stretch", "letterbox", "center_crop"))

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64, help="per process")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "adam"))
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--scheduler", default="onecycle", choices=("onecycle", "cosine", "none"))
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="cosine schedule warm-up")
    t.add_argument("--label-smoothing", type=float, default=0.05)
    t.add_argument("--class-weighting", default="balanced", choices=("balanced", "none"),
                   help="weight the loss by inverse class frequency")
    t.add_argument("--augment", default="medium", choices=("none", "light", "medium", "strong"))
    t.add_argument("--hflip", type=_bool, default=False, help="random horizontal flips (anatomy is asymmetric)")
    t.add_argument("--ema-decay", type=float, default=0.0, help="exponential moving average of weights, decay warmed up as min(d, (1+n)/(10+n)) over n updates; 0 = off")
    t.add_argument("--tta", type=_bool, default=False, help="average predictions over a horizontal flip")
    t.add_argument("--amp", type=_bool, default=True, help="mixed precision (CUDA only)")
    t.add_argument("--seed", type=int, default=42)

    v = p.add_argument_group("validation, calibration, decision")
    v.add_argument("--val-fraction", type=float, default=0.15, help="patient-grouped split when no val channel")
    v.add_argument("--min-val-per-class", type=int, default=20,
                   help="a val channel smaller than this per class is merged into train and re-split by patient")
    v.add_argument("--target-sensitivity", type=float, default=0.0,
                   help="choose the threshold reaching this validation sensitivity; 0 = maximise Youden's J")
    v.add_argument("--calibrate", type=_bool, default=True, help="fit a softmax temperature on validation")

    r = p.add_argument_group("run")
    r.add_argument("--recipe", default="cpu", choices=tuple(RECIPES),
                   help="a named set of defaults (training_job/recipes.py); other flags override it")
    r.add_argument("--limit-per-class", type=int, default=0, help="use at most this many images per class (quick runs)")
    r.add_argument("--workers", type=int, default=4, help="decoding threads")
    r.add_argument("--processes-per-host", type=int, default=0,
                   help="DDP processes per host; 0 = one per GPU (SM_NUM_GPUS), else one")
    r.add_argument("--progress", default="auto", choices=("auto", "bar", "plain"))
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
    args = parser.parse_args(norm)
    if args.epochs < 1:
        raise TrainingError(f"epochs must be at least 1 (got {args.epochs}): a zero-epoch run cannot produce a model")
    if args.batch_size < 2:
        raise TrainingError("batch-size must be at least 2 (batch normalisation needs it)")
    if not args.lr > 0:
        raise TrainingError("lr must be positive")
    if not 0 <= args.target_sensitivity < 1:
        raise TrainingError("target-sensitivity must be in [0, 1)")
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
    return args


def failure_file(args_or_none) -> Path:
    if os.environ.get("SM_OUTPUT_DIR"):
        return Path(os.environ["SM_OUTPUT_DIR"]) / "failure"
    if Path("/opt/ml/output").is_dir():
        return Path("/opt/ml/output/failure")
    out = getattr(args_or_none, "output_data_dir", None) or os.environ.get("SM_OUTPUT_DATA_DIR") or "runs/output/data"
    return Path(out).parent / "failure"


def code_version() -> str:
    """Content hash of the code that trains and serves (no git inside a training container)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in ("shared", "training_job"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return "src-" + h.hexdigest()[:12]


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def prepare_data(args, spec: PreprocessSpec, log: Log) -> tuple[D.Split, D.Split, dict]:
    try:
        train_layout = D.discover(args.train, "train")
        val_layout = D.discover(args.val, "val") if args.val else None
    except DatasetLayoutError as exc:
        raise TrainingError(str(exc)) from None
    for layout in (train_layout, val_layout):
        if layout and layout.ignored_classes:
            log(f"ignored class folders (not {'/'.join(CLASS_NAMES)}): "
                + ", ".join(f"{k} ({n} files)" for k, n in layout.ignored_classes.items()))
        if layout and layout.ignored_files:
            log(f"ignored {len(layout.ignored_files)} non-image files, e.g. {layout.ignored_files[0][0]}: {layout.ignored_files[0][1]}")
    limit = args.limit_per_class or None
    try:
        train = D.load_split(args.train, train_layout, "train", spec, args.workers, limit, log.progress)
        val = D.load_split(args.val, val_layout, "val", spec, args.workers, limit, log.progress) if val_layout else None
    except DatasetLayoutError as exc:
        raise TrainingError(str(exc)) from None
    skipped = train.skipped + (val.skipped if val else [])
    for rel, reason in skipped:
        log(f"skipped unreadable image {rel}: {reason}")
    all_files = train_layout.all_files() + (val_layout.all_files() if val_layout else [])
    info = {"fingerprint": fingerprint(all_files), "skipped": [{"file": r, "reason": why} for r, why in skipped]}

    if val is not None and min(val.class_counts().values()) < args.min_val_per_class:
        log(f"val channel is too small to choose a threshold on ({val.class_counts()}); "
            f"merging it into train and splitting by patient")
        train = D.Split(torch.cat([train.pixels, val.pixels]), torch.cat([train.labels, val.labels]),
                        train.relpaths + val.relpaths, train.patients + val.patients, train.digests + val.digests)
        val = None
    if val is None:
        groups = D.group_ids(train.patients, train.digests)
        keep, held = D.grouped_split(train.labels.numpy(), groups, args.val_fraction, args.seed)
        train, val = train.subset(keep), train.subset(held)
        info["val_source"] = (f"{args.val_fraction:.0%} of train split off by patient (stratified, grouped by patient "
                              f"and by byte-identical duplicates, seed {args.seed})")
    else:
        info["val_source"] = "the val channel as given"
    info["counts"] = {"train": train.class_counts(), "val": val.class_counts()}
    return train, val, info


def make_loss(args, train: D.Split, device) -> nn.Module:
    weight = None
    if args.class_weighting == "balanced":
        counts = torch.bincount(train.labels, minlength=len(CLASS_NAMES)).float()
        weight = (counts.sum() / (len(CLASS_NAMES) * counts.clamp_min(1))).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used after ``updates`` averaging steps: ``min(decay, (1 + n) / (10 + n))``.

    A fixed 0.999 keeps 0.999**n of the first weights in the average: after a 1,200-step run (40
    epochs of 30 batches) that is still 30 % of a nearly untrained network, and the averaged model
    predicts one class. Warming the decay up makes the average follow the last few hundred steps
    of a short run and reach ``decay`` only on long ones.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_update_fn(decay: float):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` with the warmed-up decay."""

    @torch.no_grad()
    def update(ema_tensors, model_tensors, num_averaged):
        d = ema_decay_at(decay, int(num_averaged))
        if torch.is_floating_point(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - d)
        else:  # integer buffers such as BatchNorm's num_batches_tracked
            for e, m in zip(ema_tensors, model_tensors, strict=True):
                e.copy_(m)

    return update


def make_schedule(args, optimizer, steps_per_epoch: int):
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.2)
    if args.scheduler == "cosine":
        warm = max(1, int(args.warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.05, 1.0, warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - warm)),
        ], milestones=[warm])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict_logits(model: nn.Module, split: D.Split, spec: PreprocessSpec, device, batch: int, tta: bool) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(split), batch):
        x = normalize(split.pixels[i:i + batch].to(device), spec)
        logits = model(x).float()
        if tta:
            logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros((0, len(CLASS_NAMES)))


def checkpoint_key(args, info: dict) -> str:
    """What must match for a checkpoint to be resumed: the data and every training choice."""
    skip = {"checkpoint_dir", "model_dir", "output_data_dir", "progress", "workers", "train", "val", "data"}
    hp = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    return hashlib.sha256(json.dumps([hp, info["fingerprint"]], sort_keys=True, default=str).encode()).hexdigest()


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
    spec = PreprocessSpec(size=args.image_size, channels=args.channels, resize=args.resize)

    t0 = time.time()
    train, val, info = prepare_data(args, spec, log)
    log(f"data: train {info['counts']['train']}, val {info['counts']['val']} ({info['val_source']}); "
        f"decoded once in {time.time() - t0:.1f}s")

    try:
        model = build_model(args.architecture, args.channels, len(CLASS_NAMES), args.width, args.dropout, args.pretrained)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_rank = math.ceil(len(train) / dist_info.world)
    steps_per_epoch = max(1, per_rank // args.batch_size)
    scheduler = make_schedule(args, optimizer, steps_per_epoch)
    ema = None
    if args.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update_fn(args.ema_decay), use_buffers=True)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = make_loss(args, train, device)
    eval_criterion = nn.CrossEntropyLoss()
    augment = D.Augment.preset(args.augment)
    if augment is not None and args.hflip:
        augment = dataclasses.replace(augment, hflip=True)

    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key = checkpoint_key(args, info)
    history: list[dict] = []
    best = {"epoch": 0, "val_auc": -1.0, "val_loss": float("inf")}
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

    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist_info.world > 1 else model
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(start_epoch, args.epochs + 1):
        gen.manual_seed(args.seed * 1000 + epoch)  # same batches whether resumed or not
        ddp_model.train()
        perm = torch.randperm(len(train), generator=gen)
        mine = perm[dist_info.rank::dist_info.world][: steps_per_epoch * args.batch_size]
        total, count = 0.0, 0
        t_epoch = time.time()
        batches = range(steps_per_epoch)
        for b in log.progress(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch"):
            idx = mine[b * args.batch_size:(b + 1) * args.batch_size]
            x = train.pixels[idx].to(device, non_blocking=True).unsqueeze(1).float()
            y = train.labels[idx].to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, gen)
            x = normalize(x, spec)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(ddp_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_loss = total / max(1, count)
        if dist_info.world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            train_loss = float(t[0] / t[1].clamp_min(1))

        if dist_info.main:
            eval_model = ema.module if ema is not None else model
            logits = predict_logits(eval_model, val, spec, device, 128, args.tta)
            val_loss = float(eval_criterion(logits, val.labels))
            probs = F.softmax(logits, 1)[:, POSITIVE_INDEX].numpy()
            m = metrics_at_threshold(val.labels.numpy(), probs, 0.5)
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": m["roc_auc"],
                   "val_acc": m["accuracy"], "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t_epoch}
            history.append(row)
            # The metric line SageMaker's MetricDefinitions parse: keep its format stable.
            print(f"epoch={epoch} train_loss={train_loss:.4f} val_loss={val_loss:.4f} val_auc={m['roc_auc']:.4f} "
                  f"val_acc={m['accuracy']:.4f} lr={row['lr']:.6f}", flush=True)
            improved = (m["roc_auc"], -val_loss) > (best["val_auc"], -best["val_loss"])
            if improved:
                best = {"epoch": epoch, "val_auc": m["roc_auc"], "val_loss": val_loss}
                save_checkpoint(best_path, {"model": eval_model.state_dict(), "epoch": epoch, "key": key})
            save_checkpoint(last_path, {
                "version": CHECKPOINT_VERSION, "key": key, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "history": history, "best": best,
                "rng_cpu": torch.get_rng_state(),
            })
        dist_info.barrier()

    if not dist_info.main:
        return None
    return finish(args, spec, model, best_path, val, info, history, best, started, device, log, train)


def finish(args, spec, model, best_path: Path, val: D.Split, info: dict, history: list, best: dict, started: str,
           device, log: Log, train: D.Split | None = None) -> Path:
    """Best checkpoint -> calibration and threshold on validation -> report -> bundle."""
    state = torch.load(best_path, map_location="cpu", weights_only=False)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items() if k != "n_averaged"})
    model.eval()
    logits = predict_logits(model, val, spec, torch.device("cpu"), 128, args.tta).double().numpy()
    y = val.labels.numpy()
    temperature = fit_temperature(logits, y) if args.calibrate else 1.0
    z = logits / temperature
    probs = np.exp(z - z.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True))[:, POSITIVE_INDEX]
    threshold = choose_threshold(y, probs, args.target_sensitivity)
    vm = metrics_at_threshold(y, probs, threshold)
    vm["temperature"] = temperature
    vm["best_epoch"] = best["epoch"]
    finished = utc_now()
    version = os.environ.get("TRAINING_JOB_NAME") or f"{args.architecture}-{finished.replace(':', '').replace('-', '')}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    hp = {k: v for k, v in vars(args).items() if k not in ("train", "val", "data", "model_dir", "output_data_dir", "checkpoint_dir")}
    provenance = {
        "dataset": {"fingerprint": info["fingerprint"], "counts": info["counts"], "val_source": info["val_source"],
                    "skipped": info["skipped"]},
        "hyperparameters": hp, "code_version": code_version(), "started_at": started, "finished_at": finished,
        "device": device_name, "torch": torch.__version__,
    }
    log(f"best epoch {best['epoch']}: val_auc={vm['roc_auc']:.4f}; temperature {temperature:.3f}; "
        f"threshold {threshold:.4f} -> accuracy {vm['accuracy']:.4f}, sensitivity {vm['sensitivity']:.4f}, "
        f"specificity {vm['specificity']:.4f}")

    out_data = Path(args.output_data_dir)
    out_data.mkdir(parents=True, exist_ok=True)
    write_json(out_data / "history.json", history)
    with open(out_data / "val_predictions.csv", "w") as f:
        f.write("path,label,probability_pneumonia\n")
        for rel, label, p in zip(val.relpaths, y, probs, strict=True):
            f.write(f"{rel},{CLASS_NAMES[int(label)]},{p:.6f}\n")

    model_dir = Path(args.model_dir)
    work = Path(out_data) / "report-staging"
    shutil.rmtree(work, ignore_errors=True)
    summary = {
        "model_version": version, "architecture": args.architecture, "pretrained": args.pretrained,
        "preprocessing": spec.to_dict(), "best_epoch": best["epoch"], "epochs": args.epochs,
        "temperature": temperature, "device": device_name, "started_at": started, "finished_at": finished,
        "counts": info["counts"], "val_source": info["val_source"], "fingerprint": info["fingerprint"],
        "threshold_policy": (f"the highest threshold with validation sensitivity >= {args.target_sensitivity}"
                             if args.target_sensitivity else "maximising Youden's J on validation"),
    }
    write_report(work, metrics={"validation": vm, "history": history}, y_val=y, p_val=probs, history=history,
                 summary=summary)
    ood = None
    if train is not None and min(len(train), len(val)) >= 20:  # the refusal check, fitted on these images
        ood = fit_ood(model, train.pixels.numpy(), val.pixels.numpy(), spec, args.seed)
        log(f"out-of-distribution check: distance cut-off {ood[0]['cutoff']:.1f}, upright cut-off {ood[0]['view_cutoff']:.4f}")
    try:
        write_model_bundle(model, spec, model_dir, model_version=version, threshold=threshold, temperature=temperature,
                           architecture=args.architecture, validation_metrics=vm, provenance=provenance,
                           report_dir=work, ood=ood)
    except ExportError as exc:
        raise TrainingError(f"export failed: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"bundle written to {model_dir}")
    return model_dir


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
        if fail.exists():
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
    except (TrainingError, ImageError, DatasetLayoutError) as exc:
        reason = str(exc)
    except torch.multiprocessing.ProcessRaisedException as exc:
        text = str(exc).strip().splitlines()
        reason = next((ln for ln in reversed(text) if "Error" in ln), text[-1] if text else "a training process failed")
    except KeyboardInterrupt:
        reason = "interrupted"
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log for whoever fixes it
        traceback.print_exc()
        reason = f"internal error: {type(exc).__name__}: {exc}"
    print(f"training failed: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        clear_previous_bundle(Path(getattr(args, "model_dir", None) or os.environ.get("SM_MODEL_DIR") or "runs/model"))
    with contextlib.suppress(OSError):
        fail = failure_file(args)
        fail.parent.mkdir(parents=True, exist_ok=True)
        fail.write_text(reason[:1000] + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
