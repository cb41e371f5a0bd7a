"""ONNX export, checked against torch before anything is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from shared.bundle import INPUT_NAME, OUTPUT_NAMES

from .models import Classifier, ExportWrapper

PARITY_TOLERANCE = 1e-4
OPSET = 17


class ExportError(RuntimeError):
    pass


def export_onnx(model: Classifier, example: torch.Tensor, path: str | Path) -> float:
    """Write ``model`` as ONNX (outputs: logits, features) and return the largest difference
    between ONNX Runtime and torch on ``example``; raise :class:`ExportError` above tolerance."""
    import onnxruntime as ort

    model = model.float().cpu().eval()
    wrapper = ExportWrapper(model).eval()
    example = example.float().cpu()
    path = Path(path)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is chosen on purpose (dynamo=False): it handles this
        # network's two outputs with dynamic batch exactly; torch warns that it is the legacy path.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
        )
    with torch.no_grad():
        ref_logits, ref_features = wrapper(example)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_logits, got_features = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: example.numpy()})
    diff = max(float(np.max(np.abs(got_logits - ref_logits.numpy()))),
               float(np.max(np.abs(got_features - ref_features.numpy()))))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(f"ONNX output differs from torch by {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    return diff


def cam_weights(model: Classifier) -> dict[str, list]:
    """The linear head as plain lists for ``bundle.json`` (class activation maps at serving)."""
    return {"weights": model.head.weight.detach().cpu().double().tolist(),
            "bias": model.head.bias.detach().cpu().double().tolist()}


def write_model_bundle(model: Classifier, spec, out_dir: str | Path, *, model_version: str, threshold: float,
                       temperature: float, architecture: str, validation_metrics: dict, provenance: dict,
                       report_dir: str | Path | None = None, example_batch: int = 4,
                       ood: tuple[dict, bytes] | None = None) -> Path:
    """Export ``model`` to ONNX, check parity, and write a complete bundle into ``out_dir``.

    ``ood`` is the out-of-distribution check from :func:`training_job.ood.fit_ood`; without it the
    bundle serves with the check reported unavailable."""
    import tempfile

    from shared.bundle import FORMAT_VERSION, write_bundle
    from shared.labels import CLASS_NAMES, POSITIVE_CLASS

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, spec.channels, spec.size, spec.size, generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        diff = export_onnx(model, example, onnx_path)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_version": model_version,
            "architecture": architecture,
            "class_names": list(CLASS_NAMES),
            "positive_class": POSITIVE_CLASS,
            "preprocessing": spec.to_dict(),
            "threshold": float(threshold),
            "temperature": float(temperature),
            "onnx": {"file": "model.onnx", "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES), "opset": OPSET,
                     "parity_max_abs_diff": diff},
            "cam": cam_weights(model),
            "metrics": {"validation": validation_metrics},
            "provenance": provenance,
        }
        return write_bundle(out_dir, onnx_path, meta, report_dir, ood=ood)
