"""Training input throughput: decode-once cache versus decoding every JPEG every epoch.

    python benchmarks/train_input_benchmark.py [--images N] [--size 128]

Both pipelines feed the same model (the seed CNN) the same images with comparable augmentation,
in one run on this machine:

- per-epoch decoding: a torchvision ``ImageFolder`` with PIL transforms (grayscale, resize,
  rotation, colour jitter, to-tensor, normalise) behind a ``DataLoader`` -- every epoch opens and
  decodes every JPEG again;
- decode-once: the training job's cache (``training_job.data.load_split``, shared preprocessing)
  built once, then each epoch augments the cached ``uint8`` tensors in batches.

It prints a markdown table (input-only images/s, whole-epoch seconds with the model training) and
writes it to ``benchmarks/results/train_input.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.dataset import scan_channel  # noqa: E402
from shared.labels import CLASS_NAMES  # noqa: E402
from shared.preprocessing import PreprocessSpec, normalize  # noqa: E402
from training_job.data import Augment, load_split  # noqa: E402
from training_job.models import build_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "chest_xray_224" / "train"


def subset_dir(n: int, tmp: Path) -> Path:
    per_class = n // 2
    for cls in CLASS_NAMES:
        (tmp / cls).mkdir(parents=True)
        for src in sorted((DATA / cls).iterdir())[:per_class]:
            (tmp / cls / src.name).symlink_to(src)
    return tmp


def seed_loader(root: Path, size: int, batch: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Grayscale(1), transforms.Resize((size, size)), transforms.RandomRotation(10),
        transforms.ColorJitter(0.15, 0.15), transforms.ToTensor(), transforms.Normalize([0.5], [0.25]),
    ])
    ds = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=False, drop_last=False)


def cached_batches(split, spec: PreprocessSpec, batch: int, augment: Augment, gen: torch.Generator):
    perm = torch.randperm(len(split), generator=gen)
    for i in range(0, len(split), batch):
        idx = perm[i:i + batch]
        x = augment(split.pixels[idx].unsqueeze(1).float(), gen)
        yield normalize(x, spec), split.labels[idx]


def epoch(batches, model=None, opt=None) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        n += len(y)
        if model is not None:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=0, help="0 = all 5,216 train images")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the per-epoch pipeline")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_input.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = PreprocessSpec(size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = subset_dir(args.images, Path(tmp)) if args.images else DATA
        n_images = sum(1 for c in CLASS_NAMES for _ in (root / c).iterdir())

        loader = seed_loader(root, args.size, args.batch, args.workers)
        seed_input_s, _ = epoch(loader)

        t0 = time.perf_counter()
        layout = scan_channel(root, "train")
        split = load_split(root, layout, "train", spec, workers=os.cpu_count() or 2)
        cache_build_s = time.perf_counter() - t0
        augment, gen = Augment.preset("medium"), torch.Generator().manual_seed(0)
        cached_input_s, _ = epoch(cached_batches(split, spec, args.batch, augment, gen))

        model = build_model("seed_cnn", 1, 2, width=32)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        seed_epoch_s, _ = epoch(loader, model, opt)
        cached_epoch_s, _ = epoch(cached_batches(split, spec, args.batch, augment, gen), model, opt)

    rows = [
        ("input only, images/s", f"{n_images / seed_input_s:,.0f}", f"{n_images / cached_input_s:,.0f}",
         f"{seed_input_s / cached_input_s:.1f}x"),
        ("input only, one epoch (s)", f"{seed_input_s:.1f}", f"{cached_input_s:.1f}", ""),
        ("whole epoch with seed CNN training (s)", f"{seed_epoch_s:.1f}", f"{cached_epoch_s:.1f}",
         f"{seed_epoch_s / cached_epoch_s:.2f}x"),
        ("one-time cache build (s)", "-", f"{cache_build_s:.1f}", ""),
    ]
    md = (f"# Training input throughput\n\n{n_images} images at {args.size} px, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}. "
          f"Per-epoch decoding uses a DataLoader with {args.workers} workers. Target: decode-once input "
          f"throughput at least 5x.\n\n| measure | per-epoch decoding | decode-once cache | ratio |\n|---|---:|---:|---:|\n"
          + "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in rows)
          + f"\nCommand: `python benchmarks/train_input_benchmark.py{' --images ' + str(args.images) if args.images else ''}`\n")
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
