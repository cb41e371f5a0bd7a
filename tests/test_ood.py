"""Refusing what is not a frontal chest X-ray: DICOM header rules, the pixel check, the 422 contract.

The pixel check is fitted here the way a team gives a bundle its parameters (``python -m
training_job.ood``, as for a bundle of format 1), on a part of the reference model's training folder. Every kind of
the out-of-distribution corpus (``benchmarks/ood_corpus.py``) is sent through the handler.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import DATA_224, ROOT
from PIL import Image
from test_inference_support import api_event, call

from shared.bundle import FORMAT_VERSION, BundleError, read_bundle
from shared.imaging import decode_file, decode_image
from shared.ood import CODE, NotAChestXray, check_dicom_header
from shared.predictor import OnnxPredictor
from training_job.ood import VIEW_DECISION

sys.path.insert(0, str(ROOT / "benchmarks"))
import ood_corpus  # noqa: E402

REFERENCE = ROOT / "models" / "reference" / "model.tar.gz"
PER_KIND = 3  # of the corpus's 15 per kind: enough to cover every kind, small enough for CI

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")


@pytest.fixture(scope="module")
def checked_bundle(tmp_path_factory):
    """The reference model with the check fitted by the command on every second training image (2,608).

    Every fourth (1,304 images, of which 1,118 fit the 1,280-feature covariance) left the distances
    too loose for the reference model's soup: a re-inverted X-ray landed just past the cut-off, so
    the refusal could not name the inversion. The shipped check is fitted on 3,832 training images."""
    from training_job.ood import main

    folder = tmp_path_factory.mktemp("ood-train")
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / "train" / cls).mkdir(parents=True)
        for path in sorted((DATA_224 / "train" / cls).glob("*.jpeg"))[::2]:
            os.symlink(path, folder / "train" / cls / path.name)
    out = tmp_path_factory.mktemp("ood-bundle") / "model.tar.gz"
    assert main(["--bundle", str(REFERENCE), "--data", str(folder), "--out", str(out)]) == 0
    return read_bundle(out, unpack_to=tmp_path_factory.mktemp("ood-unpacked"))


@pytest.fixture
def served(monkeypatch, tmp_path, checked_bundle):
    """The handler serving ``checked_bundle``."""
    from inference_lambda import app
    from inference_lambda.config import Settings
    from inference_lambda.model_store import ModelStore

    settings = Settings(model_uri=str(checked_bundle.root), cache_dir=tmp_path / "model-cache")
    monkeypatch.setattr(app, "settings", settings)
    monkeypatch.setattr(app, "store", ModelStore(settings))
    return app


def post(app, data: bytes, fmt: str, query=None):
    ctype = {"jpeg": "image/jpeg", "png": "image/png", "dicom": "application/dicom"}[fmt]
    return call(app, api_event("POST", "/predict", data, ctype, query=query))


def assert_refused(reply):
    assert reply.status == 422, reply.text
    body = reply.json()
    assert set(body) == {"error"} and body["error"]["code"] == CODE
    message = body["error"]["message"]
    assert "frontal" in message and "chest" in message and "Traceback" not in message
    return message


# -- the bundle -----------------------------------------------------------------------------------------


def test_command_writes_the_current_format_with_cutoffs_from_validation(checked_bundle):
    meta = checked_bundle.meta
    assert meta["format_version"] == FORMAT_VERSION == 2
    ood = meta["ood"]
    assert ood["fitted_on"]["validation_images"] >= 20 and ood["fitted_on"]["training_images"] >= 200
    # 99.95th percentile of validation: at most one validation image in 2,000 above the cut-off.
    assert ood["fitted_on"]["validation_refused"] <= 2 / ood["fitted_on"]["validation_images"] + 1e-5
    assert ood["cutoff"] > 0 and 0 < ood["view_cutoff"] <= VIEW_DECISION
    assert f"below {VIEW_DECISION}" in ood["cutoff_policy"]
    # the rest of the bundle is the reference model's, unchanged
    ref = read_bundle(REFERENCE)
    assert meta["onnx_sha256"] == ref.meta["onnx_sha256"] and meta["threshold"] == ref.threshold


def test_damaged_check_parameters_are_refused_at_load(checked_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(checked_bundle.root, copy)
    (copy / "ood.npz").write_bytes(b"not the fitted arrays")
    with pytest.raises(BundleError, match="ood.npz does not match"):
        read_bundle(copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["format_version"] = 3
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version 3 is not supported"):
        read_bundle(copy)


def format_1_bundle(folder):
    """The shipped reference model as a format-1 bundle: without the check's section and arrays."""
    import json

    from shared.bundle import BUNDLE_JSON, OOD_FILE

    bundle = read_bundle(REFERENCE, unpack_to=folder)
    meta = json.loads((bundle.root / BUNDLE_JSON).read_text())
    meta.pop("ood", None)
    meta["format_version"] = 1
    (bundle.root / OOD_FILE).unlink(missing_ok=True)
    (bundle.root / BUNDLE_JSON).write_text(json.dumps(meta))
    return bundle.root


def test_old_format_bundle_serves_with_the_check_unavailable(monkeypatch, tmp_path, originals):
    from inference_lambda import app
    from inference_lambda.config import Settings
    from inference_lambda.model_store import ModelStore

    old = format_1_bundle(tmp_path / "old")
    assert read_bundle(old).meta["format_version"] == 1
    settings = Settings(model_uri=str(old), cache_dir=tmp_path / "cache")
    monkeypatch.setattr(app, "settings", settings)
    monkeypatch.setattr(app, "store", ModelStore(settings))
    health = call(app, api_event("GET", "/health")).json()
    assert health["ood_check"]["available"] is False and "older bundle format" in health["ood_check"]["reason"]
    reply = post(app, originals[0].read_bytes(), "jpeg")
    assert reply.status == 200 and "ood_score" not in reply.json()
    # the header rules need no bundle parameters: they still refuse
    lateral = ood_corpus.dicom_bytes(np.asarray(Image.open(originals[0]).convert("L")), "CR", "LL", "CHEST")
    assert "lateral" in assert_refused(post(app, lateral, "dicom"))


# -- the corpus through the handler ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ood_corpus.KINDS)
def test_every_corpus_kind_is_refused_with_422(served, kind, capsys):
    for _name, data, fmt in ood_corpus.generate(kind, PER_KIND):
        assert_refused(post(served, data, fmt, {"explain": "1"}))
    assert '"RejectedNotChestXray"' in capsys.readouterr().out  # the EMF metric


def test_unusable_xrays_are_refused_with_the_reason(served):
    def message(kind):
        _, data, fmt = next(ood_corpus.generate(kind, 1))
        return assert_refused(post(served, data, fmt))

    assert "upside down" in message("xray_rot180")
    assert "on its side" in message("xray_rot90")
    assert "inverted grey levels" in message("xray_inverted")
    assert "not look like one" in message("flat")


# -- real X-rays ----------------------------------------------------------------------------------------


def test_accepted_answer_carries_the_score_and_is_unchanged_by_the_check(served, checked_bundle, originals):
    plain = OnnxPredictor(checked_bundle, check=False)
    for path in originals:
        reply = post(served, path.read_bytes(), "jpeg")
        assert reply.status == 200, reply.text
        body = reply.json()
        assert 0 <= body["ood_score"] <= body["ood_cutoff"]
        assert body["view_cutoff"] <= body["view_probability"] <= 1
        expected = plain.predict(decode_image(path.read_bytes(), "jpeg", checked_bundle.preprocessing.size))
        assert body["probability"] == expected.probability and body["label"] == expected.label


def test_real_dev_half_xrays_are_accepted(checked_bundle):
    predictor = OnnxPredictor(checked_bundle)
    paths = ood_corpus.dev_xrays(60, offset=120)  # not among the images the corpus turns or crops
    refused = []
    for path in paths:
        try:
            predictor.predict(decode_file(path, checked_bundle.preprocessing.size))
        except NotAChestXray:
            refused.append(path.name)
    # Cut-offs fitted on 48 validation images only; the benchmark measures the full-size fit.
    assert len(refused) <= 1, refused


def test_score_pixels_reports_refusals_per_image_for_batch_scoring(checked_bundle):
    from shared.preprocessing import to_model_pixels

    spec = checked_bundle.preprocessing
    real = [to_model_pixels(decode_file(p, spec.size).image, spec) for p in ood_corpus.dev_xrays(2, offset=120)]
    pixels = np.stack([*real, np.zeros((spec.size, spec.size), np.uint8), np.rot90(real[0], 2)])
    probs, refused = OnnxPredictor(checked_bundle).score_pixels(pixels)
    assert refused[0] is None and refused[1] is None and np.isfinite(probs[:2]).all()
    assert all(isinstance(r, NotAChestXray) and r.code == CODE for r in refused[2:]) and np.isnan(probs[2:]).all()
    assert "upside down" in refused[3].message


def test_batch_scoring_refuses_what_the_api_refuses_and_evaluation_scores_everything(checked_bundle):
    from shared.preprocessing import decode_min_side
    from shared.scoring import score

    real = [(p.name, p.read_bytes()) for p in ood_corpus.dev_xrays(2, offset=120)]
    odd = [(f"{kind}.{fmt}", data) for kind in ("photo", "document", "xray_rot180")
           for _name, data, fmt in ood_corpus.generate(kind, 1)]
    items = [(key, None, (lambda d=data: d)) for key, data in real + odd]
    predictor = OnnxPredictor(checked_bundle)
    side = decode_min_side(checked_bundle.preprocessing)
    batch = list(score(items, [predictor], refuse=True))
    assert [r.key for r in batch] == [k for k, _ in real + odd]
    for row, (_key, data) in zip(batch[:2], real, strict=True):  # accepted: the probability POST /predict answers
        assert row.ok and row.probabilities == pytest.approx([predictor.predict(decode_image(data, None, side)).probability], abs=1e-6)
    for row in batch[2:]:
        assert row.error_code == CODE and row.probabilities == [] and "frontal" in row.error, row
    assert "upside down" in batch[4].error
    # Evaluation compares models on the same images: nothing is refused, the probabilities are the network's.
    evaluation = list(score(items, [predictor, predictor]))
    assert all(r.ok and len(r.probabilities) == 2 for r in evaluation)
    assert evaluation[0].probabilities[0] == pytest.approx(batch[0].probabilities[0], abs=1e-6)


def test_batch_step_writes_the_refusal_into_the_predictions(checked_bundle, monkeypatch):
    """The Distributed Map's scoring Lambda (``infra.functions.batch.score_batch``) on an S3 prefix:
    a photo gets ``not_a_chest_xray`` and no label, a real X-ray its label and probability."""
    import csv
    import io

    import boto3
    import moto

    from infra.functions import batch
    from infra.functions.common import Clients, Settings, StepContext

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    predictor = OnnxPredictor(checked_bundle)
    monkeypatch.setattr(batch, "predictor_for", lambda s3, uri, sha: predictor)
    xray = ood_corpus.dev_xrays(1, offset=120)[0]
    _name, photo, _fmt = next(ood_corpus.generate("photo", 1))
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="in/a-xray.jpeg", Body=xray.read_bytes())
        s3.put_object(Bucket="data", Key="in/b-photo.jpeg", Body=photo)
        event = {"Items": [{"Key": "in/a-xray.jpeg"}, {"Key": "in/b-photo.jpeg"}],
                 "BatchInput": {"bucket": "data", "model_uri": "s3://data/model.tar.gz", "sha256": "0" * 64,
                                "work_uri": "s3://data/batch/out.csv.parts-1/"}}
        result = batch.score_batch(event, StepContext(Settings(), Clients(s3=s3)))
        body = s3.get_object(Bucket="data", Key=result["part"])["Body"].read().decode()
    assert result["scored"] == 1 and result["refused"] == 1
    rows = {r[0]: dict(zip(batch.COLUMNS, r, strict=True)) for r in csv.reader(io.StringIO(body))}
    assert rows["in/b-photo.jpeg"]["error_code"] == CODE and rows["in/b-photo.jpeg"]["label"] == ""
    assert rows["in/b-photo.jpeg"]["probability"] == "" and "frontal" in rows["in/b-photo.jpeg"]["error"]
    assert rows["in/a-xray.jpeg"]["label"] in ("NORMAL", "PNEUMONIA") and rows["in/a-xray.jpeg"]["error_code"] == ""


def test_health_names_the_check_and_its_cutoffs(served, checked_bundle):
    body = call(served, api_event("GET", "/health")).json()
    check = body["ood_check"]
    assert check["available"] is True and check["name"] == checked_bundle.meta["ood"]["name"]
    assert check["ood_cutoff"] == round(checked_bundle.meta["ood"]["cutoff"], 3)
    assert check["view_cutoff"] == round(checked_bundle.meta["ood"]["view_cutoff"], 6)


# -- DICOM header rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "view", "part", "refused"), [
    ("CR", "PA", "CHEST", None), ("DX", "AP", None, None), (None, None, None, None), ("", "", "", None),
    ("dx", "pa", "chest", None), ("DX", None, "THORAX", None),
    ("CT", None, None, "modality as CT"), ("MR", "PA", "CHEST", "modality as MR"), ("US", None, None, "US"),
    ("CR", "LL", "CHEST", "lateral"), ("DX", "RL", None, "lateral"), (None, "LATERAL", None, "lateral"),
    ("CR", "PA", "SKULL", "body part"), (None, None, "HAND", "body part"),
])
def test_dicom_header_rules(modality, view, part, refused):
    ds = SimpleNamespace(**{k: v for k, v in (("Modality", modality), ("ViewPosition", view),
                                               ("BodyPartExamined", part)) if v is not None})
    if refused is None:
        check_dicom_header(ds)
    else:
        with pytest.raises(NotAChestXray, match=refused):
            check_dicom_header(ds)


def test_header_rules_decide_before_any_pixel_work(originals):
    arr = np.asarray(Image.open(originals[0]).convert("L"))
    good = ood_corpus.dicom_bytes(arr, "CT", None, None)
    # Truncated pixel data: decoding it would fail as corrupt; the header refusal comes first.
    with pytest.raises(NotAChestXray, match="CT"):
        decode_image(good[:-1000], "dicom")
    # Missing tags are no reason to refuse: the same X-ray without them decodes.
    assert decode_image(ood_corpus.dicom_bytes(arr, None, None, None), "dicom").width == arr.shape[1]


def test_header_refusal_leaks_no_free_text_value():
    ds = SimpleNamespace(Modality="PATIENT JOHN DOE 1970")
    with pytest.raises(NotAChestXray) as err:
        check_dicom_header(ds)
    assert "JOHN" not in err.value.message


def test_page_shows_the_refusal_as_a_message():
    page = (ROOT / "inference_lambda" / "static" / "index.html").read_text()
    assert '"not_a_chest_xray"' in page and "No diagnosis was made" in page


def test_generated_corpus_matches_the_committed_manifest():
    import csv
    import hashlib

    rows = list(csv.DictReader(open(ROOT / "benchmarks" / "ood_corpus_manifest.csv")))
    assert len(rows) >= 150 and len({r["kind"] for r in rows}) >= 10
    first = {r["file"]: r for r in rows}
    for kind in ("flat", "noise", "xray_rot180", "dicom_header"):  # pure numpy/Pillow kinds, stable across platforms
        for name, data, fmt in ood_corpus.generate(kind, 2):
            assert first[name]["kind"] == kind and first[name]["format"] == fmt
            if kind != "dicom_header":  # DICOM UIDs embed the pydicom version
                assert first[name]["sha256"] == hashlib.sha256(data).hexdigest()


def test_training_fits_the_check_from_the_torch_model_into_the_bundle(tmp_path):
    """The call training makes before writing the bundle: torch model in, a format-2 bundle out whose
    ONNX predictor refuses a flat image and accepts the training images it was fitted on."""
    import torch

    from shared.preprocessing import PreprocessSpec, to_model_pixels
    from training_job.export import write_model_bundle
    from training_job.models import build_model
    from training_job.ood import fit_ood

    torch.manual_seed(0)
    spec = PreprocessSpec(size=64, channels=1)
    model = build_model("seed_cnn", in_channels=1, width=8).eval()
    paths = sorted((DATA_224 / "train" / "PNEUMONIA").glob("*.jpeg"))[:90]
    pixels = np.stack([to_model_pixels(decode_file(p, 64).image, spec) for p in paths])
    ood = fit_ood(model, pixels[:60], pixels[60:], spec)
    bundle = read_bundle(write_model_bundle(
        model, spec, tmp_path / "b", model_version="t", threshold=0.5, temperature=1.0, architecture="seed_cnn",
        validation_metrics={}, ood=ood,
        provenance={"dataset": {}, "hyperparameters": {}, "code_version": "t", "started_at": "t",
                    "finished_at": "t", "device": "cpu"}))
    assert bundle.meta["format_version"] == 2 and bundle.meta["ood"]["fitted_on"]["training_images"] == 60
    predictor = OnnxPredictor(bundle)
    _, refused = predictor.score_pixels(np.concatenate([pixels[:10], np.full((1, 64, 64), 128, np.uint8)]))
    assert sum(r is not None for r in refused[:10]) <= 1 and refused[10] is not None
