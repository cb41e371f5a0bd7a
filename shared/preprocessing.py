"""The preprocessing spec and the one function that applies it.

The spec is plain data stored in every model bundle; serving reads it from the bundle and never
holds a constant of its own. Preprocessing is split in two steps so that training can cache the
first one:

1. :func:`to_model_pixels`: decoded grayscale image -> ``uint8`` array of the model's size
   (resize policy and resampling from the spec). Training caches this output once per image.
2. :func:`normalize`: ``uint8`` array(s) -> ``float32`` network input (scale, mean, std, channels).

:func:`preprocess` chains both; serving and evaluation call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

RESIZE_POLICIES = ("stretch", "letterbox", "center_crop")
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an X-ray becomes a network input.

    ``stretch`` squashes the whole image to ``size`` without keeping the aspect ratio, which is how
    the public 224 px copy of the dataset was made; ``letterbox`` pads to a square first;
    ``center_crop`` crops the central square.
    """

    size: int = 224
    channels: int = 1
    resize: str = "stretch"
    resample: str = "bicubic"
    mean: float = 0.5
    std: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 16 <= int(self.size) <= 1024:
            raise ValueError(f"preprocessing size must be between 16 and 1024 px, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {tuple(RESAMPLING)}, got {self.resample!r}")
        if not self.std > 0:
            raise ValueError("preprocessing std must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {k: data[k] for k in ("size", "channels", "resize", "resample", "mean", "std", "extra") if k in data}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**known)


def decode_min_side(spec: PreprocessSpec) -> int:
    """The shortest side a JPEG must keep when decoded (``shared.imaging.decode_image(min_side=)``).

    libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost, and the network sees
    no more than ``spec.size`` pixels a side. Training, evaluation and serving all decode through
    this rule, so they see the same pixels.
    """
    return int(spec.size)


def to_model_pixels(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize a decoded grayscale (mode ``L``) image to the spec's square size; ``uint8`` HxW."""
    if image.mode != "L":
        image = image.convert("L")
    w, h = image.size
    if spec.resize == "letterbox" and w != h:
        side = max(w, h)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    elif spec.resize == "center_crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), RESAMPLING[spec.resample])
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels, spec: PreprocessSpec):
    """Pixels in 0..255 (HxW, NxHxW or Nx1xHxW) -> NxCxHxW ``float32`` network input.

    Accepts a numpy array (serving, evaluation) or a torch tensor (training, on its device after
    augmentation): the same arithmetic either way, so the two sides cannot drift apart.
    """
    if hasattr(pixels, "dim"):  # a torch tensor; torch is imported only by training
        x = pixels.float()
        while x.dim() < 4:
            x = x.unsqueeze(0) if x.dim() == 2 else x.unsqueeze(1)
        x = (x / 255.0 - spec.mean) / spec.std
        return x.expand(-1, 3, -1, -1) if spec.channels == 3 else x
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    x = (x / np.float32(255.0) - np.float32(spec.mean)) / np.float32(spec.std)
    if spec.channels == 3:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image -> a 1xCxHxW ``float32`` batch, exactly as the model was trained."""
    return normalize(to_model_pixels(image, spec), spec)
