"""Scoring many images with one or more bundles, through the serving path.

The evaluation command, the pipeline's Evaluate step and batch inference all score images here,
with the decoding (:func:`shared.imaging.decode_image`), preprocessing and ONNX Runtime predictor
(:class:`shared.predictor.OnnxPredictor`) the inference Lambda uses, at each bundle's own
threshold: the probability a row holds is the probability ``POST /predict`` answers for the same
bytes.

A file that cannot be used (unreadable, not an image, refused by a check of
:mod:`shared.imaging`) becomes a row with the error's stable ``code`` and message, never a crash
and never a prediction, so one bad file never stops a batch. Batch inference also applies the
bundle's out-of-distribution check (``refuse=True``), so a photo or a turned X-ray gets the
``not_a_chest_xray`` refusal ``POST /predict`` answers with. Evaluation does not: every labelled
image of an evaluation set counts for every model compared, so the comparison stays paired on the
same images (the refusal benchmark measures how many real X-rays the check accepts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from .imaging import FILE_EXTENSIONS, ImageError, decode_image
from .predictor import OnnxPredictor
from .preprocessing import decode_min_side, to_model_pixels

DEFAULT_CHUNK = 64  # images decoded and predicted together: bounded memory, batched ONNX Runtime calls


@dataclass
class ScoredImage:
    """One image's outcome. ``probabilities[i]`` is P(PNEUMONIA) from ``predictors[i]`` (float in
    [0, 1]); on a refused file ``probabilities`` is empty and ``error_code`` / ``error`` say why."""

    key: str
    label: int | None = None  # the true class index when known (evaluation), else None
    probabilities: list[float] = field(default_factory=list)
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


def format_hint(key: str) -> str | None:
    """The decoding hint from a file name's extension (needed for preamble-less DICOM)."""
    return FILE_EXTENSIONS.get(PurePosixPath(key).suffix.lower())


def score(items: Iterable[tuple[str, int | None, Callable[[], bytes]]], predictors: Sequence[OnnxPredictor],
          chunk: int = DEFAULT_CHUNK, refuse: bool = False) -> Iterator[ScoredImage]:
    """Score ``items`` (key, true label or None, a function returning the file's bytes) with every
    predictor; yields one :class:`ScoredImage` per item, in input order.

    With ``refuse``, an image that any predictor's out-of-distribution check refuses
    (:meth:`OnnxPredictor.score_pixels`) becomes a row with code ``not_a_chest_xray`` and the
    refusal's message (the first refusing predictor's), as ``POST /predict`` would answer it.

    Each predictor sees the image decoded as the Lambda decodes it for that bundle
    (``decode_min_side`` of its preprocessing), so two bundles with different input sizes are each
    scored exactly as they would be served. Reading the bytes may raise ``OSError`` (or any error
    of the function given): that file becomes an ``unreadable`` row.
    """
    specs = [p.bundle.preprocessing for p in predictors]
    pending: list[tuple[ScoredImage, list[np.ndarray]]] = []

    def flush() -> Iterator[ScoredImage]:
        ok = [(row, pix) for row, pix in pending if row.ok]
        for i, predictor in enumerate(predictors):
            if not ok:
                break
            stack = np.stack([pix[i] for _, pix in ok])
            if refuse:
                probs, refusals = predictor.score_pixels(stack, batch_size=chunk)
            else:
                probs, refusals = predictor.positive_probabilities(stack, batch_size=chunk), [None] * len(ok)
            for (row, _), p, refusal in zip(ok, probs, refusals, strict=True):
                if refusal is not None:
                    row.probabilities.clear()
                    row.error_code, row.error = refusal.code, refusal.message
                else:
                    row.probabilities.append(float(p))
            ok = [(row, pix) for row, pix in ok if row.ok]
        yield from (row for row, _ in pending)
        pending.clear()

    for key, label, read in items:
        row = ScoredImage(key, label)
        pixels: list[np.ndarray] = []
        try:
            data = read()
            decoded: dict[int, object] = {}
            for spec in specs:
                side = decode_min_side(spec)
                if side not in decoded:
                    decoded[side] = decode_image(data, format_hint(key), side)
                pixels.append(to_model_pixels(decoded[side].image, spec))
        except ImageError as exc:
            row.error_code, row.error = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - an unreadable object is a row, not the end of the batch
            row.error_code, row.error = "unreadable", f"could not read the file ({type(exc).__name__})"
        pending.append((row, pixels))
        if len(pending) >= chunk:
            yield from flush()
    if pending:
        yield from flush()
