"""One epoch of training and one pass of evaluation, as torchvision's classification reference
splits them: the loss, the learning-rate schedule, the weight average and the loop live here;
``train.py`` reads arguments, launches processes, resumes checkpoints and calls these.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.evaluation import metrics_at_threshold
from shared.labels import CLASS_NAMES, POSITIVE_INDEX
from shared.preprocessing import PreprocessSpec, normalize

from . import data as D

# What --select-metric may choose the best epoch by: name -> (history key, larger is better).
SELECT_METRICS = {"roc_auc": ("val_auc", True), "loss": ("val_loss", False), "accuracy": ("val_acc", True)}


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


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups: the classifier head (``model.head``) at ``lr``, the rest of
    the network at ``lr * backbone_lr_scale`` (discriminative fine-tuning: Howard & Ruder, "Universal
    Language Model Fine-tuning for Text Classification", ACL 2018). A scale of 1 gives one group.

    ``lr`` > 0 and ``backbone_lr_scale`` in (0, 1]; raises ``ValueError`` otherwise.
    """
    if not lr > 0 or not 0 < backbone_lr_scale <= 1:
        raise ValueError(f"need lr > 0 and backbone_lr_scale in (0, 1], got {lr} and {backbone_lr_scale}")
    if backbone_lr_scale == 1:
        return [{"params": list(model.parameters()), "lr": lr}]
    head = {id(q) for q in model.head.parameters()}
    return [{"params": list(model.head.parameters()), "lr": lr},
            {"params": [q for q in model.parameters() if id(q) not in head], "lr": lr * backbone_lr_scale}]


def make_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or Adam (``args.optimizer``) over :func:`parameter_groups` of ``model`` with
    ``args.lr``, ``args.backbone_lr_scale`` and ``args.weight_decay``. AdamW's decoupled weight decay
    is scaled by each group's learning rate, so a slower backbone also decays more slowly."""
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(parameter_groups(model, args.lr, args.backbone_lr_scale), lr=args.lr,
                   weight_decay=args.weight_decay)


def make_schedule(args, optimizer, steps_per_epoch: int):
    """The learning-rate schedule over ``args.epochs`` epochs; each parameter group peaks at its own
    ``lr`` (see :func:`parameter_groups`)."""
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=0.2)
    if args.scheduler == "cosine":
        warm = max(1, int(args.warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.05, 1.0, warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - warm)),
        ], milestones=[warm])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _inputs(split: D.Split, spec: PreprocessSpec, device, batch: int):
    """The split's images in order, ``batch`` at a time, as normalised network inputs on ``device``."""
    for i in range(0, len(split), batch):
        yield normalize(split.pixels[i:i + batch].to(device), spec)


@torch.no_grad()
def predict_logits(model: nn.Module, split: D.Split, spec: PreprocessSpec, device, batch: int) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for every image of ``split``: N x classes float32 on the CPU.

    Test-time views are part of the model (:class:`training_job.models.TestTimeViews`), so this
    is what the exported ONNX graph computes."""
    model.eval()
    out = []
    for x in _inputs(split, spec, device, batch):
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, len(CLASS_NAMES)))


def train_one_epoch(model: nn.Module, ddp_model: nn.Module, train: D.Split, spec: PreprocessSpec, optimizer,
                    scheduler, scaler, criterion: nn.Module, augment: D.Augment | None, ema, batches: list[torch.Tensor],
                    device: torch.device, use_amp: bool, generator: torch.Generator, mixup: float = 0.0,
                    progress=None) -> tuple[float, int]:
    """Run ``batches`` (index tensors into ``train``) once; returns (summed loss, images seen).

    ``generator`` draws the augmentation, so a resumed run sees the same batches as an unbroken one.
    ``mixup`` > 0 blends each batch with a shuffled copy of itself, weight ~ Beta(mixup, mixup), and
    the loss likewise (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018).
    Each batch is taken from the ``uint8`` cache, augmented on ``device``, normalised with the
    bundle's preprocessing spec, and stepped with the optimizer, the scheduler and (if given) the
    weight average. ``model`` is the bare network the average follows; ``ddp_model`` may wrap it.
    """
    ddp_model.train()
    total, count = 0.0, 0
    for idx in (progress(batches) if progress else batches):
        x = train.pixels[idx].to(device, non_blocking=True).unsqueeze(1).float()
        y = train.labels[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        x = normalize(x, spec)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        lam, partner = 1.0, None
        if mixup > 0:
            lam = float(torch.distributions.Beta(mixup, mixup).sample())
            partner = torch.randperm(len(idx), generator=generator).to(device)
            x = x.mul(lam).add_(x[partner], alpha=1.0 - lam)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = ddp_model(x)
            loss = criterion(out, y) if partner is None else lam * criterion(out, y) + (1 - lam) * criterion(out, y[partner])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total, count


def evaluate(model: nn.Module, split: D.Split, spec: PreprocessSpec, device: torch.device) -> dict:
    """Loss and figures of ``model`` on a labelled split at threshold 0.5 (the per-epoch metric line):
    ``{"val_loss", "val_auc", "val_acc", "logits"}`` with logits N x 2 float32 on the CPU."""
    t0 = time.time()
    logits = predict_logits(model, split, spec, device, 128)
    loss = float(nn.CrossEntropyLoss()(logits, split.labels))
    probs = F.softmax(logits, 1)[:, POSITIVE_INDEX].numpy()
    m = metrics_at_threshold(split.labels.numpy(), probs, 0.5)
    return {"val_loss": loss, "val_auc": m["roc_auc"], "val_acc": m["accuracy"], "logits": logits,
            "seconds": time.time() - t0}


def is_better(row: dict, best: dict, select_metric: str) -> bool:
    """Whether epoch ``row`` beats ``best`` on ``select_metric``; ties go to the lower validation loss."""
    key, larger = SELECT_METRICS[select_metric]
    if key not in best:
        return True
    sign = 1 if larger else -1
    return (sign * row[key], -row["val_loss"]) > (sign * best[key], -best["val_loss"])


def softmax_positive(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(PNEUMONIA) of N x 2 logits divided by ``temperature``: N float64 in [0, 1]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True))[:, POSITIVE_INDEX]


@torch.no_grad()
def head_features(model: nn.Module, split: D.Split, spec: PreprocessSpec, device: torch.device,
                    batch: int = 128) -> torch.Tensor:
    """The classifier head's input for every image of ``split``: N x K float32 on the CPU (the
    network in eval mode, no augmentation, no dropout): the plain spatial mean of the last feature
    map, not the square-root pooling of the out-of-distribution check (``shared.ood.pooled_features``)."""
    model.eval()
    out = [torch.flatten(model.pool(model.features(x)), 1).float().cpu() for x in _inputs(split, spec, device, batch)]
    return torch.cat(out) if out else torch.zeros((0, model.head.in_features))


def fit_linear_probe(model: nn.Module, train: D.Split, spec: PreprocessSpec, device: torch.device, c: float,
                     balanced: bool = True) -> dict:
    """Set ``model.head`` to a logistic regression on the frozen network's pooled features.

    The first stage of LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and
    Underperform Out-of-Distribution", ICLR 2022): fine-tuning that starts from a fitted head
    changes the pretrained features less than one that starts from a random head. The regression
    is scikit-learn's L2-penalised ``LogisticRegression`` with inverse strength ``c`` (> 0), with
    balanced class weights when ``balanced`` (as ``--class-weighting balanced`` weights the loss);
    its log-odds of class index 1 against 0, w and b, is written as the two-class head
    ``[-w/2, w/2]``, ``[-b/2, b/2]``, whose softmax gives the same probabilities. Returns
    ``{"c", "train_accuracy", "seconds"}``. Raises ``ValueError`` when ``c`` is not positive.
    """
    from sklearn.linear_model import LogisticRegression

    if not c > 0:
        raise ValueError(f"the linear probe's inverse regularisation strength must be positive, got {c}")
    t0 = time.time()
    x = head_features(model, train, spec, device).double().numpy()
    y = train.labels.numpy()
    clf = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=5000).fit(x, y)
    w = torch.as_tensor(clf.coef_[0], dtype=model.head.weight.dtype)
    b = float(clf.intercept_[0])
    sign = torch.tensor([-0.5, 0.5], dtype=w.dtype).view(2, 1)
    with torch.no_grad():
        model.head.weight.copy_((sign * w).to(model.head.weight.device))
        model.head.bias.copy_((sign[:, 0] * b).to(model.head.bias.device))
    return {"c": c, "train_accuracy": float(clf.score(x, y)), "seconds": time.time() - t0}


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as the bare network's ``load_state_dict`` takes them: a weight
    average's (``torch.optim.swa_utils.AveragedModel``) ``module.`` key prefix and its
    ``n_averaged`` counter dropped; any other state dict is returned with the same tensors."""
    return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}


def interpolate_weights(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * initial + alpha * final`` for every floating-point tensor of a
    state dict (weights and batch-norm statistics); integer buffers (batch counters) come from
    ``final``. Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: the weight
    average of a pretrained model and its fine-tuned self keeps more of the robustness to a
    distribution shift than either end. ``alpha`` in [0, 1]; 1 returns ``final``. Raises
    ``ValueError`` for an ``alpha`` outside [0, 1] or state dicts with different keys or shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the interpolation weight must be in [0, 1], got {alpha}")
    if initial.keys() != final.keys():
        raise ValueError("the initial and fine-tuned weights belong to different networks")
    out = {}
    for k, v in final.items():
        w0 = initial[k]
        if w0.shape != v.shape:
            raise ValueError(f"weight {k} has shape {tuple(w0.shape)} initially and {tuple(v.shape)} after training")
        out[k] = w0.to(v.dtype).mul(1.0 - alpha).add(v, alpha=alpha) if v.is_floating_point() else v.clone()
    return out


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A uniform model soup: the mean of every floating-point tensor over ``states`` (weights and
    batch-norm statistics); integer buffers (batch counters) come from the first state dict.
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022: networks fine-tuned from the same
    pretrained weights tend to lie in one basin of the loss, and their average often generalises to
    a shifted distribution better than its members, at the inference cost of one network (not
    always: compare it with them on held-out data). Keys may carry the
    ``module.`` prefix and ``n_averaged`` counter of a weight average; both are dropped. Raises
    ``ValueError`` for no state dicts, or ones with different keys or shapes."""
    if not states:
        raise ValueError("a model soup needs at least one network's weights")
    clean = [plain_state_dict(s) for s in states]
    first = clean[0]
    out = {}
    for i, s in enumerate(clean[1:], start=2):
        if s.keys() != first.keys():
            raise ValueError(f"network {i} of the soup has other weights than network 1: they are different networks")
    for k, v in first.items():
        for i, s in enumerate(clean[1:], start=2):
            if s[k].shape != v.shape:
                raise ValueError(f"weight {k} has shape {tuple(s[k].shape)} in network {i} and {tuple(v.shape)} in network 1")
        if v.is_floating_point():
            out[k] = torch.stack([s[k].to(v.dtype) for s in clean]).mean(0)
        else:
            out[k] = v.clone()
    return out
