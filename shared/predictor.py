"""Running a bundle's ONNX model on images: the one inference path.

Serving (the Lambda) and the evaluation command both predict through :class:`OnnxPredictor`, so
the probability the API returns for an image is the probability evaluation measured. ONNX Runtime
is imported lazily: the rest of ``shared`` does not need it.

When the bundle carries the out-of-distribution check (``shared/ood.py``), :meth:`OnnxPredictor.predict`
raises :class:`~shared.ood.NotAChestXray` instead of predicting for an image it refuses, and
:meth:`OnnxPredictor.score_pixels` reports refusals per image for batch scorers. The check reads the
feature map the network computes anyway; it never changes an accepted image's prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .bundle import INPUT_NAME, OUTPUT_NAMES, Bundle
from .imaging import DecodedImage
from .ood import NotAChestXray, OodCheck, Verdict, refusal, undo_view
from .preprocessing import normalize, to_model_pixels


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float  # of the positive class
    probabilities: dict[str, float]
    threshold: float
    logits: np.ndarray
    features: np.ndarray | None = None  # K x h x w, kept for class activation maps
    pixels: np.ndarray | None = None  # the model-sized uint8 image the features came from
    verdict: Verdict | None = None  # the out-of-distribution check's, when the bundle has one


class OnnxPredictor:
    """One ONNX Runtime session per bundle, created once; ``threads`` defaults to the CPUs present."""

    def __init__(self, bundle: Bundle, threads: int | None = None, spin_wait: bool = True, check: bool = True):
        """``check=False`` skips the out-of-distribution check even when the bundle has one.
        ``spin_wait=False`` makes idle intra-op threads sleep at once instead of spinning for more
        work: slightly slower back-to-back batches, but a request's decoding and resizing no longer
        compete with spinning threads for the few vCPUs a Lambda function has."""
        import onnxruntime as ort

        self.bundle = bundle
        self.spec = bundle.preprocessing
        opts = ort.SessionOptions()
        n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        opts.intra_op_num_threads = max(1, int(n))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if not spin_wait:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(bundle.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        if tuple(outputs[:2]) != OUTPUT_NAMES or self.session.get_inputs()[0].name != INPUT_NAME:
            raise ValueError(f"model.onnx must take '{INPUT_NAME}' and return {OUTPUT_NAMES}, found {outputs}")
        self.ood: OodCheck | None = bundle.ood_check() if check else None

    def run_pixels(self, pixels: np.ndarray, with_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Model-sized ``uint8`` pixels (HxW or NxHxW) -> (logits N x classes, features or None)."""
        x = normalize(pixels, self.spec)
        names = list(OUTPUT_NAMES) if with_features else [OUTPUT_NAMES[0]]
        out = self.session.run(names, {INPUT_NAME: x})
        return out[0], (out[1] if with_features else None)

    def positive_probabilities(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probability of the positive class for a stack of model-sized images."""
        probs = []
        for start in range(0, len(pixels), batch_size):
            logits, _ = self.run_pixels(pixels[start:start + batch_size])
            probs.append(self.bundle.positive_probability(logits))
        return np.concatenate(probs) if probs else np.zeros(0)

    def refusal_for(self, pixels: np.ndarray, verdict: Verdict) -> NotAChestXray:
        """The refusal for one refused image (H x W uint8): when the view classifier says it is a turned
        or inverted X-ray, the network checks the corrected image too, so the reason names the problem
        only when undoing it gives an accepted X-ray."""
        upright = undo_view(pixels, verdict.view)
        corrected = None
        if upright is not None and self.ood is not None:
            _, features = self.run_pixels(upright, with_features=True)
            corrected = self.ood.assess(upright, features)[0]
        return refusal(verdict, corrected)

    def score_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, list[NotAChestXray | None]]:
        """For a stack of model-sized images (N x H x W uint8): the probability of the positive class
        (N float64) and, per image, the :class:`NotAChestXray` refusing it or None. Without the check
        (an older bundle, ``check=False``) nothing is refused. A refused image's probability is NaN."""
        probs, refused = [], []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size]
            logits, features = self.run_pixels(chunk, with_features=self.ood is not None)
            p = self.bundle.positive_probability(logits)
            verdicts = self.ood.assess(chunk, features) if self.ood is not None else [None] * len(chunk)
            for i, v in enumerate(verdicts):
                refused.append(None if v is None or v.accepted else self.refusal_for(chunk[i], v))
                if refused[-1] is not None:
                    p[i] = np.nan
            probs.append(p)
        return (np.concatenate(probs) if probs else np.zeros(0)), refused

    def predict(self, image: DecodedImage, with_features: bool = False) -> Prediction:
        """One decoded image -> :class:`Prediction`; raises :class:`~shared.ood.NotAChestXray` when the
        bundle's out-of-distribution check refuses it."""
        pixels = to_model_pixels(image.image, self.spec)
        logits, features = self.run_pixels(pixels, with_features or self.ood is not None)
        verdict = None
        if self.ood is not None:
            verdict = self.ood.assess(pixels, features)[0]
            if not verdict.accepted:
                raise self.refusal_for(pixels, verdict)
        probs = self.bundle.probabilities(logits)[0]
        names = self.bundle.class_names
        pos = float(probs[self.bundle.positive_index])
        threshold = self.bundle.threshold
        negative = next(n for i, n in enumerate(names) if i != self.bundle.positive_index)
        label = names[self.bundle.positive_index] if pos >= threshold else negative
        return Prediction(
            label=label,
            probability=pos,
            probabilities={n: float(p) for n, p in zip(names, probs, strict=True)},
            threshold=threshold,
            logits=logits[0],
            features=features[0] if with_features else None,
            pixels=pixels if with_features else None,
            verdict=verdict,
        )


def class_activation_map(bundle: Bundle, features: np.ndarray, class_index: int) -> np.ndarray:
    """CAM = sum_k w[class, k] * F_k, from the exported feature map; scaled to 0..1 (h x w)."""
    weights, _ = bundle.cam_weights()
    cam = np.tensordot(weights[class_index], features.astype(np.float32), axes=(0, 0))
    cam = np.maximum(cam, 0)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam
