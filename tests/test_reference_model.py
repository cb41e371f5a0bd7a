"""The shipped reference model: it loads, its ONNX runs, and it was trained on what it says.

Its recorded dataset fingerprint must equal the fingerprint of the development part of
``../shared/data`` (train minus the patient-grouped held-out part the recipe benchmark scores
on), recomputed here from ``manifest.csv``: proof that no held-out image was trained on.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ROOT

from shared.bundle import read_bundle
from shared.dataset import fingerprint
from shared.imaging import decode_file
from shared.labels import CLASS_NAMES
from shared.predictor import OnnxPredictor

REFERENCE = ROOT / "models" / "reference" / "model.tar.gz"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert REFERENCE.is_file(), f"{REFERENCE} is missing"
    return read_bundle(REFERENCE, unpack_to=tmp_path_factory.mktemp("reference"))


def test_reference_is_small_and_complete(reference):
    assert REFERENCE.stat().st_size <= 25 * 1024 * 1024  # the serving budget for a bundle
    assert reference.class_names == CLASS_NAMES
    for f in ("metrics.json", "roc.png", "confusion_matrix.png", "learning_curves.png", "MODEL_CARD.md"):
        assert (reference.root / "report" / f).is_file()
    card = (reference.root / "report" / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card and "CC BY 4.0" in card


def test_reference_onnx_runs_on_real_xrays(reference, originals):
    predictor = OnnxPredictor(reference)
    for path in originals:
        pred = predictor.predict(decode_file(path), with_features=True)
        assert 0.0 <= pred.probability <= 1.0 and pred.label in CLASS_NAMES
        assert pred.features.ndim == 3 and np.isfinite(pred.features).all()


def test_reference_was_trained_on_the_development_split_only(reference):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_benchmark import holdout_split

    dev, held = holdout_split()
    dev_relpaths = ["train/" + "/".join(rel.split("/")[-2:]) for rel, _ in dev]
    recorded = reference.meta["provenance"]["dataset"]["fingerprint"]
    assert recorded == fingerprint(dev_relpaths)
    counts = reference.meta["provenance"]["dataset"]["counts"]
    trained_on = sum(counts["train"].values()) + sum(counts["val"].values())
    assert trained_on == len(dev) and len(dev) + len(held) == 5216


def test_reference_was_trained_by_the_default_recipe_as_committed(reference):
    """The shipped bundle is what ``training_job.train`` with its default (cpu) recipe produces:
    every value the recipe sets is the one recorded in the bundle's provenance."""
    from training_job.recipes import RECIPES

    hp = reference.meta["provenance"]["hyperparameters"]
    assert hp["recipe"] == "cpu"
    for key, value in RECIPES["cpu"].items():
        assert hp[key] == value, key
    weights = reference.meta["provenance"]["initial_weights"]
    assert weights["name"] == "ImageNet EfficientNet-Lite0" and len(weights["sha256"]) == 64
    assert reference.meta["format_version"] >= 2 and reference.meta.get("ood")  # carries the refusal check
