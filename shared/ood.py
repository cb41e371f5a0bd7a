"""Is this a frontal chest X-ray? The refusal check serving runs before it diagnoses anything.

Two layers, cheapest first:

1. **DICOM header rules** (:func:`check_dicom_header`), read before any pixel is decoded: a
   ``Modality`` other than CR/DX, a lateral or decubitus ``ViewPosition``, or a
   ``BodyPartExamined`` that names another body part is refused. A missing or empty tag is never
   a reason to refuse.
2. **Pixels** (:class:`OodCheck`), from what the network computes anyway, with parameters fitted
   at training time on the training images (``training_job/ood.py``) and stored in the bundle:

   - *typicality*: the squared Mahalanobis distance of the image's pooled features to the
     training images' (one Gaussian, Ledoit-Wolf shrunk covariance; Lee et al., "A Simple Unified
     Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).
     The pooled feature is the spatial mean of the square root of the last (post-ReLU) feature map,
     which separated flat, synthetic and document images from X-rays far better than the plain mean
     in our measurement (``benchmarks/ood_benchmark.py``);
   - *view*: a multinomial logistic regression on [pooled features, an 8x8 thumbnail of the model
     pixels] that tells an upright frontal X-ray from the same X-rays turned by 90/180/270 degrees,
     with inverted polarity, or cropped to a corner: the kinds of unusable X-ray the typicality
     score alone misses (a chest turned upside down still has typical features). Self-supervised
     transformation prediction as in Hendrycks et al., "Using Self-Supervised Learning Can Improve
     Model Robustness and Uncertainty", NeurIPS 2019.

   Each has a cut-off chosen on validation images, never on out-of-distribution examples: the
   distance's is a high percentile of the validation X-rays' distances; the view's refuses an
   upright frontal probability below 0.5 (more likely turned, inverted or cropped than not), or
   below a low percentile of the validation X-rays' where that is lower. An image is refused when
   either says so.

Refusals are :class:`NotAChestXray` (an :class:`~shared.imaging.ImageError` with code
``not_a_chest_xray`` and HTTP status 422), so anything that already reports unusable images (the
API, training's skipped-file list, evaluation) reports these too, with a human reason.

Only numpy is needed here; serving never imports scikit-learn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from .imaging import ImageError

CODE = "not_a_chest_xray"
CHECK_NAME = "mahalanobis-pooled-features+view-classifier"
EXPECTED = "a frontal (PA or AP) chest radiograph"

# The classes of the view classifier, in the order of its weights. Index 0 is the only acceptable one.
VIEW_CLASSES = ("frontal", "rotated_90", "rotated_180", "rotated_270", "inverted", "partial")
THUMBNAIL_SIDE = 8

ACCEPTED_MODALITIES = frozenset({"CR", "DX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XTABLE"})
# BodyPartExamined values (DICOM PS3.16 CID 4031 code meanings, upper case, as modalities write them)
# that describe the chest or a region containing it; any other non-empty value is refused.
CHEST_BODY_PARTS = frozenset({
    "CHEST", "THORAX", "LUNG", "LUNGS", "HEART", "RIBS", "RIB", "STERNUM", "MEDIASTINUM", "CHEST_ABDOMEN",
    "CHESTABDOMEN", "CHEST_ABDOMEN_PELVIS", "CHESTABDPELVIS", "THORAX_ABDOMEN", "TSPINE", "THORACIC SPINE",
    "WHOLEBODY", "WHOLE BODY", "BODY", "TRUNK", "UPPER BODY", "UPPERBODY", "NECK_CHEST", "CHEST_PA", "CHEST PA",
})


class NotAChestXray(ImageError):
    """The input is not a frontal chest X-ray: refused, with the reason in ``message`` (HTTP 422)."""

    code = CODE
    http_status = 422


def _refuse(why: str) -> NotAChestXray:
    return NotAChestXray(f"this service reads {EXPECTED} only; {why}")


def _tag(ds: Any, name: str) -> str:
    value = getattr(ds, name, None)
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__len__"):  # multi-valued: take the first
        value = value[0] if len(value) else ""
    return str(value).strip().upper()


def check_dicom_header(ds: Any) -> None:
    """Raise :class:`NotAChestXray` when a DICOM header says the file is not a frontal chest X-ray.

    ``ds`` is a pydicom ``Dataset`` (only ``Modality``, ``ViewPosition`` and ``BodyPartExamined``
    are read; no pixel data is touched). Rules, in order: ``Modality`` present and not CR or DX
    (DICOM PS3.3 C.7.3.1.1.1 defined terms; DX covers digital radiography, CR computed radiography);
    ``ViewPosition`` lateral or decubitus (LL, RL, LLD, RLD and free-text LATERAL); a non-empty
    ``BodyPartExamined`` outside :data:`CHEST_BODY_PARTS`. The reason names the tag's meaning, not its
    raw value, except for the standard codes quoted above.
    """
    modality = _tag(ds, "Modality")
    if modality and modality not in ACCEPTED_MODALITIES:
        shown = modality if modality.isalnum() and len(modality) <= 4 else "another modality"
        raise _refuse(f"the DICOM header gives the modality as {shown}, not a radiograph (CR or DX)")
    view = _tag(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        raise _refuse(f"the DICOM header gives a lateral view ({view}); send the frontal view")
    part = _tag(ds, "BodyPartExamined")
    if part and part not in CHEST_BODY_PARTS:
        raise _refuse("the DICOM header names a body part other than the chest (BodyPartExamined)")


# -- pixel features -----------------------------------------------------------------------------------


def pooled_features(features: np.ndarray) -> np.ndarray:
    """Feature maps N x K x h x w (float, post-ReLU) -> N x K float64: spatial mean of sqrt(max(F, 0))."""
    f = np.asarray(features, dtype=np.float64)
    return np.sqrt(np.maximum(f, 0.0)).mean(axis=(2, 3))


def thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Model pixels N x H x W uint8 -> N x side*side float64 in 0..1: block means over a side x side grid
    (edges of H, W split as evenly as ``np.linspace`` allows)."""
    p = np.asarray(pixels, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    _, h, w = p.shape
    rows = np.linspace(0, h, side + 1).astype(int)
    cols = np.linspace(0, w, side + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(p, rows[:-1], axis=1), cols[:-1], axis=2)
    area = np.outer(np.diff(rows), np.diff(cols))
    return (sums / area / 255.0).reshape(len(p), side * side)


def view_inputs(pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The view classifier's input: [pooled features, thumbnail] (N x (K + 64) float64)."""
    return np.concatenate([pooled_features(features), thumbnail(pixels)], axis=1)


def apply_view(pixels: np.ndarray, view: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Turn upright model pixels (H x W uint8, square) into ``view``; ``partial`` is a corner crop
    of 20-50 % of the side, resized back (bilinear). Used to fit the view classifier."""
    if view == "frontal":
        return pixels
    if view.startswith("rotated_"):
        return np.ascontiguousarray(np.rot90(pixels, int(view.split("_")[1]) // 90))
    if view == "inverted":
        return 255 - pixels
    if view == "partial":
        from PIL import Image

        rng = rng or np.random.default_rng(0)
        h, w = pixels.shape
        c = max(8, int(min(h, w) * rng.uniform(0.2, 0.5)))
        corner = int(rng.integers(4))
        x0 = 0 if corner % 2 == 0 else w - c
        y0 = 0 if corner < 2 else h - c
        crop = Image.fromarray(np.ascontiguousarray(pixels[y0:y0 + c, x0:x0 + c]))
        return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    raise ValueError(f"unknown view {view!r}; one of {VIEW_CLASSES}")


def undo_view(pixels: np.ndarray, view: str) -> np.ndarray | None:
    """The upright image, if ``view`` can be undone (rotations, inversion); else None."""
    if view.startswith("rotated_"):
        return np.ascontiguousarray(np.rot90(pixels, -(int(view.split("_")[1]) // 90)))
    if view == "inverted":
        return 255 - pixels
    return None


# -- the check ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One image's check. ``score`` is the squared Mahalanobis distance (>= 0, unitless) and
    ``cutoff`` its limit; ``view_probability`` is P(upright frontal) in 0..1 and ``view_cutoff`` its
    lower limit; ``view`` the view classifier's most probable class."""

    score: float
    cutoff: float
    view_probability: float
    view_cutoff: float
    view: str

    @property
    def typical(self) -> bool:
        return self.score <= self.cutoff

    @property
    def upright(self) -> bool:
        return self.view_probability >= self.view_cutoff

    @property
    def accepted(self) -> bool:
        return self.typical and self.upright

    def public(self) -> dict[str, float]:
        """What an accepted answer carries (JSON-safe)."""
        return {"ood_score": round(self.score, 3), "ood_cutoff": round(self.cutoff, 3),
                "view_probability": round(self.view_probability, 6), "view_cutoff": round(self.view_cutoff, 6)}


_VIEW_REASONS = {
    "rotated_90": "it looks like a chest X-ray turned on its side (by 90 degrees); send it upright",
    "rotated_270": "it looks like a chest X-ray turned on its side (by 90 degrees); send it upright",
    "rotated_180": "it looks like a chest X-ray turned upside down; send it upright",
    "inverted": "it looks like a chest X-ray with inverted grey levels (bones dark); send it as a radiograph "
                "is displayed, bones white",
}


class OodCheck:
    """The pixel check with its fitted parameters (from a bundle's ``ood`` section and ``ood.npz``).

    Arrays: ``mean`` (K,), ``precision`` (K x K), ``view_mean`` / ``view_scale`` (K+64,) standardising
    the view inputs, ``view_weights`` (classes x (K+64)), ``view_bias`` (classes,); all float64.
    """

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.meta = dict(meta)
        self.cutoff = float(meta["cutoff"])
        self.view_cutoff = float(meta["view_cutoff"])
        self.mean = np.asarray(arrays["mean"], dtype=np.float64)
        self.precision = np.asarray(arrays["precision"], dtype=np.float64)
        self.view_mean = np.asarray(arrays["view_mean"], dtype=np.float64)
        self.view_scale = np.asarray(arrays["view_scale"], dtype=np.float64)
        self.view_weights = np.asarray(arrays["view_weights"], dtype=np.float64)
        self.view_bias = np.asarray(arrays["view_bias"], dtype=np.float64)
        k = self.mean.shape[0]
        if (self.precision.shape != (k, k) or self.view_weights.shape != (len(VIEW_CLASSES), k + THUMBNAIL_SIDE ** 2)
                or self.view_bias.shape != (len(VIEW_CLASSES),) or self.view_mean.shape != (k + THUMBNAIL_SIDE ** 2,)
                or self.view_scale.shape != self.view_mean.shape):
            raise ValueError("out-of-distribution parameters have inconsistent shapes")

    @staticmethod
    def load_arrays(data: bytes) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def distances(self, features: np.ndarray) -> np.ndarray:
        d = pooled_features(features) - self.mean
        # (d P) . d row by row: a BLAS matrix product, where einsum's three-operand form loops in
        # Python-level C (1.5 ms against 0.3 ms for EfficientNet's 1,280 channels).
        return ((d @ self.precision) * d).sum(axis=1)

    def view_probabilities(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        x = (view_inputs(pixels, features) - self.view_mean) / self.view_scale
        z = x @ self.view_weights.T + self.view_bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def assess(self, pixels: np.ndarray, features: np.ndarray) -> list[Verdict]:
        """Model pixels (N x H x W uint8) and the network's feature maps (N x K x h x w) -> verdicts."""
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature maps have {features.shape[1]} channels; the check was fitted on "
                             f"{self.mean.shape[0]}")
        pixels = pixels[None] if pixels.ndim == 2 else pixels
        dist = self.distances(features)
        probs = self.view_probabilities(pixels, features)
        return [Verdict(float(d), self.cutoff, float(p[0]), self.view_cutoff, VIEW_CLASSES[int(np.argmax(p))])
                for d, p in zip(dist, probs, strict=True)]

    def public(self) -> dict[str, Any]:
        """For ``/health``: the check's name, cut-offs and how they were chosen."""
        return {"available": True, "name": CHECK_NAME, "ood_cutoff": round(self.cutoff, 3),
                "view_cutoff": round(self.view_cutoff, 6),
                "cutoff_policy": self.meta.get("cutoff_policy"), "fitted_on": self.meta.get("fitted_on")}


UNAVAILABLE = {"available": False, "name": CHECK_NAME,
               "reason": "the model bundle carries no out-of-distribution parameters (an older bundle format); "
                         "only the DICOM header rules apply"}


def refusal(verdict: Verdict, corrected: Verdict | None = None) -> NotAChestXray:
    """The refusal for an image whose verdict is not accepted.

    ``corrected`` is the verdict of the same image with its most probable view undone (turned upright
    or re-inverted), when the caller computed it: if that one is accepted, the reason names the
    problem; otherwise the image is simply not a recognisable chest X-ray.
    """
    if corrected is not None and corrected.accepted and verdict.view in _VIEW_REASONS:
        return _refuse(_VIEW_REASONS[verdict.view])
    if verdict.view == "partial" and verdict.typical:
        return _refuse("it looks like only part of a chest X-ray (a crop); send the whole radiograph")
    return _refuse(f"this image does not look like one (out-of-distribution score {verdict.score:.1f}, "
                   f"cut-off {verdict.cutoff:.1f}; upright frontal view probability {verdict.view_probability:.3f}, "
                   f"cut-off {verdict.view_cutoff:.3f})")
