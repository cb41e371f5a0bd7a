"""What a finished run writes: calibration and threshold on validation, the report, and the ONNX
model bundle, checked against torch before anything is written."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from shared.bundle import INPUT_NAME, OUTPUT_NAMES
from shared.evaluation import metrics_with_ci
from shared.labels import CLASS_NAMES

from . import engine as E
from .metrics import fit_temperature, threshold_for_policy
from .models import Classifier, ExportWrapper, TestTimeViews, with_test_time_views
from .ood import fit_ood
from .report import write_json, write_report

PARITY_TOLERANCE = 1e-4
OPSET = 17


class ExportError(RuntimeError):
    pass


def export_onnx(model: Classifier | TestTimeViews, example: torch.Tensor, path: str | Path) -> float:
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
        # It also notes, three times per export, that a Slice with a step other than 1 is left
        # unfolded: the graph stays exact (the parity check below measures it).
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
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
                       ood: tuple[dict, bytes] | None = None, tta_hflip: bool = False,
                       tta_zoom_out: tuple[float, ...] = ()) -> Path:
    """Export ``model`` to ONNX, check parity, and write a complete bundle into ``out_dir``.

    ``ood`` is the out-of-distribution check from :func:`training_job.ood.fit_ood`; without it the
    bundle serves with the check reported unavailable. ``tta_hflip`` and ``tta_zoom_out`` put
    test-time views into the graph (:class:`training_job.models.TestTimeViews`); ``bundle.json``
    lists them under ``onnx.test_time_views``."""
    import tempfile

    from shared.bundle import FORMAT_VERSION, write_bundle
    from shared.labels import CLASS_NAMES, POSITIVE_CLASS

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, spec.channels, spec.size, spec.size, generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        served = with_test_time_views(model, spec.size, tta_hflip, tta_zoom_out)
        diff = export_onnx(served, example, onnx_path)
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
                     "parity_max_abs_diff": diff,
                     "test_time_views": {"hflip": bool(tta_hflip), "zoom_out": list(tta_zoom_out)}},
            "cam": cam_weights(model),
            "metrics": {"validation": validation_metrics},
            "provenance": provenance,
        }
        return write_bundle(out_dir, onnx_path, meta, report_dir, ood=ood)


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


def write_outputs(args, spec, model: Classifier, best_path: Path, val, info: dict, history: list, best: dict,
                  started: str, device, log, train=None) -> Path:
    """Best checkpoint -> temperature and threshold on validation -> report -> ONNX bundle in ``args.model_dir``.

    ``val`` is the validation :class:`training_job.data.Split`; with ``train`` (the training Split)
    the out-of-distribution check is fitted on both and stored in the bundle. ``log`` prints a line. Raises
    :class:`ExportError` when the ONNX model does not match torch. ``best["epoch"]`` is the chosen
    epoch, or for a model soup the list of each network's (``history`` rows then carry ``member``)."""
    state = torch.load(best_path, map_location="cpu", weights_only=False)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    model.load_state_dict(E.plain_state_dict(state["model"]))
    model.eval()
    # Calibration and the threshold see what the exported graph computes, test-time views included.
    served = with_test_time_views(model, spec.size, args.tta, args.tta_zoom_out)
    logits = E.predict_logits(served, val, spec, torch.device("cpu"), 128).double().numpy()
    y = val.labels.numpy()
    temperature = fit_temperature(logits, y) if args.calibrate else 1.0
    probs = E.softmax_positive(logits, temperature)
    threshold, policy = threshold_for_policy(args.threshold_policy, y, probs, args.target_sensitivity)
    vm = metrics_with_ci(y, probs, threshold)
    vm["temperature"] = temperature
    vm["best_epoch"] = best["epoch"]
    finished = utc_now()
    version = os.environ.get("TRAINING_JOB_NAME") or f"{args.architecture}-{finished.replace(':', '').replace('-', '')}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    hp = {k: v for k, v in vars(args).items() if k not in ("train", "val", "data", "model_dir", "output_data_dir", "checkpoint_dir")}
    provenance = {
        "dataset": {"fingerprint": info["fingerprint"], "counts": info["counts"], "val_source": info["val_source"],
                    "skipped": info["skipped"]},
        "initial_weights": info.get("initial_weights"), "hyperparameters": hp, "code_version": code_version(), "started_at": started, "finished_at": finished,
        "device": device_name, "torch": torch.__version__,
    }
    chosen = (f"soup of best epochs {', '.join(map(str, best['epoch']))}" if isinstance(best["epoch"], list)
              else f"best epoch {best['epoch']}")
    log(f"{chosen}: validation ROC AUC {vm['roc_auc']:.4f}; temperature {temperature:.3f}; "
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
        "initial_weights": (info.get("initial_weights") or {}).get("name"), "select_metric": args.select_metric,
        "threshold_policy": policy, "test_time_views": {"hflip": bool(args.tta), "zoom_out": list(args.tta_zoom_out)},
        "soup_seeds": [args.seed + m for m in range(args.soup)] if args.soup > 1 else None,
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
                           report_dir=work, ood=ood, tta_hflip=args.tta, tta_zoom_out=tuple(args.tta_zoom_out))
    except ExportError as exc:
        raise ExportError(f"export failed: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"bundle written to {model_dir}")
    return model_dir
