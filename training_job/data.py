"""Finding, decoding, caching and splitting the training images.

Each image is decoded and resized once (shared preprocessing, step 1) into a ``uint8`` tensor
cache; every epoch then augments those tensors in batches, on the training device. Re-decoding
JPEGs every epoch, as a torchvision ImageFolder pipeline does, is what made CPU training slow.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.dataset import DatasetLayoutError, Layout, fingerprint, held_out_folds, patient_key, scan_channel
from shared.imaging import FILE_EXTENSIONS, ImageError, decode_image
from shared.labels import CLASS_NAMES
from shared.preprocessing import PreprocessSpec, decode_min_side, to_model_pixels


@dataclass
class Split:
    """Decoded images of one split: ``pixels`` N x H x W uint8, ``labels`` N int64."""

    pixels: torch.Tensor
    labels: torch.Tensor
    relpaths: list[str]
    patients: list[str]
    digests: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.relpaths)

    def subset(self, idx) -> Split:
        idx = list(int(i) for i in idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.pixels[t], self.labels[t], [self.relpaths[i] for i in idx],
                     [self.patients[i] for i in idx], [self.digests[i] for i in idx])

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()
        return dict(zip(CLASS_NAMES, counts, strict=True))


def discover(channel_dir: str | Path, split: str) -> Layout:
    """Layout of a channel folder; raises :class:`DatasetLayoutError` naming what is missing."""
    layout = scan_channel(channel_dir, split)
    if split not in layout.files:
        raise DatasetLayoutError(
            f"channel '{split}' at {channel_dir} has no NORMAL/ and PNEUMONIA/ class folders"
            + (f" (found: {', '.join(k.split('/', 1)[1] for k in layout.ignored_classes)})" if layout.ignored_classes else "")
        )
    for cls in CLASS_NAMES:
        if not layout.files[split][cls]:
            raise DatasetLayoutError(f"class {cls} in channel '{split}' has no images ({channel_dir}/{cls}/ is missing or empty)")
    return layout


def _decode_one(path: Path, spec: PreprocessSpec) -> tuple[np.ndarray | None, str, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", f"cannot read: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_image(data, FILE_EXTENSIONS.get(path.suffix.lower()), decode_min_side(spec))
    except ImageError as exc:
        return None, digest, exc.message
    return to_model_pixels(decoded.image, spec), digest, ""


def load_split(channel_dir: str | Path, layout: Layout, split: str, spec: PreprocessSpec, workers: int = 4,
               limit_per_class: int | None = None, progress=None) -> Split:
    """Decode every image of ``split`` once; unreadable files are skipped and listed with a reason."""
    root = Path(channel_dir)
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(CLASS_NAMES):
        rels = layout.files[split][cls]
        if limit_per_class:
            rels = rels[:limit_per_class]
        items += [(r, label) for r in rels]
    paths = [root / r.split("/", 1)[1] for r, _ in items]
    pixels, labels, rels, patients, digests, skipped = [], [], [], [], [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: _decode_one(p, spec), paths)
        if progress is not None:
            results = progress(results, total=len(paths), desc=f"decode {split}", unit="img")
        for (rel, label), (arr, digest, reason) in zip(items, results, strict=True):
            if arr is None:
                skipped.append((rel, reason))
                continue
            pixels.append(arr)
            labels.append(label)
            rels.append(rel)
            patients.append(patient_key(rel))
            digests.append(digest)
    got = set(labels)
    for label, cls in enumerate(CLASS_NAMES):
        if label not in got:
            bad = sum(1 for r, _ in skipped if r.split("/")[1].upper() == cls)
            raise DatasetLayoutError(f"class {cls} in '{split}' has no readable images ({bad} unreadable)")
    stack = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros((0, spec.size, spec.size), dtype=torch.uint8)
    return Split(stack, torch.as_tensor(labels, dtype=torch.long), rels, patients, digests, skipped)


def group_ids(patients: list[str], digests: list[str]) -> np.ndarray:
    """One id per connected group: images of one patient, and byte-identical files, stay together."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pat, dig in zip(patients, digests, strict=True):
        a, b = find("p:" + pat), find("h:" + dig)
        if a != b:
            parent[b] = a
    roots = [find("p:" + p) for p in patients]
    index = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return np.asarray([index[r] for r in roots])


def grouped_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held-out) indices: stratified by class, grouped by patient/duplicate group."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < fraction < 0.5:
        raise ValueError(f"a held-out fraction must be between 0 and 0.5, got {fraction}")
    n_splits = held_out_folds(fraction)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return np.sort(keep), np.sort(held)


def prepare_data(args, spec: PreprocessSpec, log) -> tuple[Split, Split, dict]:
    """The data policy of a training run: (train, validation, info).

    Decodes the train (and optional val) channel once; lists skipped files; merges a val channel
    smaller than ``args.min_val_per_class`` per class into train; splits validation off train by
    patient when there is none. ``info`` holds the dataset fingerprint, the skipped files, where
    validation came from and the class counts. Raises :class:`DatasetLayoutError` naming what is wrong.
    """
    train_layout = discover(args.train, "train")
    val_layout = discover(args.val, "val") if args.val else None
    for layout in (train_layout, val_layout):
        if layout and layout.ignored_classes:
            log(f"ignored class folders (not {'/'.join(CLASS_NAMES)}): "
                + ", ".join(f"{k} ({n} files)" for k, n in layout.ignored_classes.items()))
        if layout and layout.ignored_files:
            log(f"ignored {len(layout.ignored_files)} non-image files, e.g. {layout.ignored_files[0][0]}: {layout.ignored_files[0][1]}")
    limit = args.limit_per_class or None
    train = load_split(args.train, train_layout, "train", spec, args.workers, limit, log.progress)
    val = load_split(args.val, val_layout, "val", spec, args.workers, limit, log.progress) if val_layout else None
    skipped = train.skipped + (val.skipped if val else [])
    for rel, reason in skipped:
        log(f"skipped unreadable image {rel}: {reason}")
    all_files = train_layout.all_files() + (val_layout.all_files() if val_layout else [])
    info = {"fingerprint": fingerprint(all_files), "skipped": [{"file": r, "reason": why} for r, why in skipped]}

    if val is not None and min(val.class_counts().values()) < args.min_val_per_class:
        log(f"val channel is too small to choose a threshold on ({val.class_counts()}); "
            f"merging it into train and splitting by patient")
        train = Split(torch.cat([train.pixels, val.pixels]), torch.cat([train.labels, val.labels]),
                        train.relpaths + val.relpaths, train.patients + val.patients, train.digests + val.digests)
        val = None
    if val is None:
        groups = group_ids(train.patients, train.digests)
        keep, held = grouped_split(train.labels.numpy(), groups, args.val_fraction, args.seed)
        train, val = train.subset(keep), train.subset(held)
        info["val_source"] = (f"{args.val_fraction:.0%} of train split off by patient (stratified, grouped by patient "
                              f"and by byte-identical duplicates, seed {args.seed})")
    else:
        info["val_source"] = "the val channel as given"
    info["counts"] = {"train": train.class_counts(), "val": val.class_counts()}
    return train, val, info


# ---- augmentation on cached uint8 tensors -------------------------------------------------


# The widest range of random scales (image side relative to the frame) the command line accepts:
# half to one and a half times the decoded size keeps the chest recognisable in a 128-256 px frame.
AUGMENT_SCALE_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class Augment:
    """Random geometric and photometric changes a radiograph plausibly shows.

    Applied in batches to the cached images on the training device. Geometry is a random resized
    crop of a border-replicated batch (a random scale per batch, a random translation per image),
    which costs one resize and a slice; a scale below 1 shrinks the image inside the frame and
    replicates its border pixels around it, as the zoom-out test-time views do
    (:class:`training_job.models.TestTimeViews`); rotation needs a full affine resampling per image
    (``grid_sample``), several times dearer on a CPU, so only presets that ask for it pay for it. Photometric:
    brightness, contrast, gamma, Gaussian blur (an unsharp or lower-resolution detector: one
    sigma per batch, applied to a random half of the images) and Gaussian noise drawn from a fixed
    bank (fresh ``randn`` per pixel would cost more than the rest together). Horizontal flips only
    when asked: anatomy is not left-right symmetric.
    """

    rotate_deg: float = 0.0
    # (smallest, largest) side of the image relative to the frame, drawn uniformly; 1 = as decoded
    scale: tuple[float, float] = (0.90, 1.10)
    translate: float = 0.06
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: float = 0.15
    noise: float = 0.02
    blur: float = 0.0  # largest Gaussian sigma in px of the network input; 0 = none
    hflip: bool = False

    @classmethod
    def preset(cls, name: str) -> Augment | None:
        presets = {
            "none": None,
            "light": cls(scale=(0.95, 1.05), translate=0.03, brightness=0.1, contrast=0.1, gamma=0.0, noise=0.0),
            "medium": cls(),
            "strong": cls(rotate_deg=10, scale=(0.85, 1.15), translate=0.08, brightness=0.25, contrast=0.25, gamma=0.25,
                          noise=0.03),
            # acquisition: what another hospital's detectors and exposure settings change, without
            # the costly rotation: wider contrast, gamma and scale, blur and noise
            "acquisition": cls(scale=(0.85, 1.15), translate=0.08, brightness=0.2, contrast=0.3, gamma=0.35, noise=0.03,
                               blur=1.5),
        }
        if name not in presets:
            raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(presets)}")
        return presets[name]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x``: N x 1 x H x W float in 0..255 -> same shape, augmented, still 0..255."""
        n, _, h, w = x.shape
        dev = x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator).mul(hi - lo).add(lo)

        s, tx, ty = u(*self.scale), u(-self.translate, self.translate), u(-self.translate, self.translate)
        if self.rotate_deg > 0:
            ang = u(-self.rotate_deg, self.rotate_deg) * (math.pi / 180)
            cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
            theta = torch.stack([torch.stack([cos, -sin, tx * 2], 1), torch.stack([sin, cos, ty * 2], 1)], 1).to(dev)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            # One scale per batch (a single resize of the whole batch), a translation per image
            # (a slice): a resized crop at a fraction of the cost of resampling each image.
            lo, hi = self.scale
            sb = lo + float(torch.rand(1, generator=generator)) * (hi - lo)
            hb, wb = max(2, round(h * sb)), max(2, round(w * sb))
            if (hb, wb) != (h, w):
                x = F.interpolate(x, size=(hb, wb), mode="bilinear", align_corners=False)
            py = max(0, (h - hb + 1) // 2) + int(math.ceil(self.translate * h)) + 1
            px = max(0, (w - wb + 1) // 2) + int(math.ceil(self.translate * w)) + 1
            xp = F.pad(x, (px, px, py, py), mode="replicate")
            y0 = (py + (hb - h) // 2 + (ty * h).round().long()).tolist()
            x0 = (px + (wb - w) // 2 + (tx * w).round().long()).tolist()
            x = torch.stack([xp[i, :, y0[i]:y0[i] + h, x0[i]:x0[i] + w] for i in range(n)])
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        if self.blur > 0:
            sigma = 0.5 + float(torch.rand(1, generator=generator)) * (self.blur - 0.5)
            pick = (torch.rand(n, generator=generator) < 0.5).to(dev).view(n, 1, 1, 1)
            x = torch.where(pick, _gaussian_blur(x, sigma), x)
        # Photometric changes: gamma, then contrast about the image mean and brightness folded into
        # one multiply-add; every full-batch pass costs about as much as the whole crop.
        scale = 1.0
        if self.gamma > 0:
            g = torch.exp(u(-self.gamma, self.gamma)).to(dev).view(n, 1, 1, 1)
            x = torch.pow(x.mul_(1.0 / 255.0), g)
            scale = 255.0
        c = (1 + u(-self.contrast, self.contrast)).to(dev).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True) * scale
        shift = mean * (1 - c) + u(-self.brightness, self.brightness).to(dev).view(n, 1, 1, 1) * 127.5
        x = torch.addcmul(shift, x, c * scale)
        if self.noise > 0:
            bank = _noise_bank(x.shape[1:], dev)
            pick = torch.randint(0, bank.shape[0], (n,), generator=generator).to(dev)
            x = x.add_(bank[pick], alpha=self.noise * 255.0)
        return x.clamp_(0, 255)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N x 1 x H x W with a kernel of radius ceil(2 sigma), borders replicated."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


_NOISE: dict = {}


def _noise_bank(shape, device, frames: int = 64) -> torch.Tensor:
    key = (tuple(shape), str(device))
    if key not in _NOISE:
        _NOISE[key] = torch.randn((frames, *shape), generator=torch.Generator().manual_seed(12345)).to(device)
    return _NOISE[key]
