"""Champion vs challenger on the same real X-rays: the Evaluate step, the gate and the registry.

The model in service is the shipped reference model; candidates are bundles whose own validation
figures are perfect, so only the evaluation set can tell them apart. 24 + 24 test images keep
scoring to a few seconds.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_224, ROOT
from test_infra_functions import ARTIFACTS, DATA, aws, fake_training, pointer, start_state  # noqa: F401
from test_infra_functions import upload_dataset as upload_fake

from infra.functions import evaluate, starter
from infra.pipeline import execute
from shared.bundle import ARCHIVE_NAME, BUNDLE_JSON, pack, read_bundle
from shared.dataset import build_manifest, scan_relpaths
from shared.evaluation import paired_comparison
from shared.pointer import ModelPointer

REFERENCE = ROOT / "models" / "reference" / ARCHIVE_NAME
PERFECT = {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "precision": 1.0, "f1": 1.0, "roc_auc": 1.0}
PER_CLASS = 24
LOW_THRESHOLDS = {"roc_auc": 0.5}


def eval_images(per_class: int = PER_CLASS) -> list[tuple[str, Path]]:
    out = []
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((DATA_224 / "test" / cls).iterdir())
        out += [(f"test/{cls}/{p.name}", p) for p in files[:: max(1, len(files) // per_class)][:per_class]]
    return out


def upload_with_test_split(ctx, name: str, extra: dict[str, bytes] | None = None):
    s3 = ctx.clients.s3
    rels = []
    for rel, path in eval_images():
        s3.put_object(Bucket=DATA, Key=f"datasets/{name}/{rel}", Body=path.read_bytes())
        rels.append(rel)
    for cls in ("NORMAL", "PNEUMONIA"):
        rel = f"train/{cls}/IM-0001-0001.jpeg"  # training is faked: never decoded
        s3.put_object(Bucket=DATA, Key=f"datasets/{name}/{rel}", Body=b"\xff\xd8 not decoded")
        rels.append(rel)
    for rel, body in (extra or {}).items():
        s3.put_object(Bucket=DATA, Key=f"datasets/{name}/{rel}", Body=body)
        rels.append(rel)
    manifest = build_manifest(name, scan_relpaths(rels), "2026-01-01T00:00:00Z")
    resp = ctx.clients.s3.put_object(Bucket=DATA, Key=f"datasets/{name}/_READY", Body=json.dumps(manifest).encode())
    return starter.marker_event(DATA, f"datasets/{name}/_READY", version_id=resp.get("VersionId"), etag=resp["ETag"])


@pytest.fixture(scope="module")
def candidates(tiny_bundle, tmp_path_factory):
    """``worse``: an untrained net with perfect validation figures; ``equal``: the reference model
    itself under another version name (a different archive, the same predictions)."""
    root = tmp_path_factory.mktemp("candidates")
    worse = root / "worse"
    shutil.copytree(tiny_bundle, worse)
    meta = json.loads((worse / BUNDLE_JSON).read_text())
    meta["model_version"], meta["metrics"]["validation"] = "worse-but-perfect-on-validation", PERFECT
    (worse / BUNDLE_JSON).write_text(json.dumps(meta))
    equal = root / "equal"
    read_bundle(REFERENCE, unpack_to=equal)
    meta = json.loads((equal / BUNDLE_JSON).read_text())
    meta["model_version"] = "reference-retrained"
    (equal / BUNDLE_JSON).write_text(json.dumps(meta))
    return {"worse": pack(worse, root / "worse.tar.gz"), "equal": pack(equal, root / "equal.tar.gz")}


def serve_reference(ctx):
    """The reference model in service, as promoted by an earlier run."""
    from shared.bundle import file_sha256

    ctx.clients.s3.upload_file(str(REFERENCE), ARTIFACTS, "models/reference/model.tar.gz")
    p = ModelPointer(f"s3://{ARTIFACTS}/models/reference/model.tar.gz", file_sha256(REFERENCE),
                     read_bundle(REFERENCE).version, "2026-01-01T00:00:00Z")
    ctx.clients.ssm.put_parameter(Name=ctx.settings.pointer_parameter, Value=p.to_json(), Type="String", Overwrite=True)
    return p


@pytest.mark.slow
def test_a_worse_candidate_is_rejected_on_the_same_images_despite_perfect_validation(aws, candidates):  # noqa: F811
    aws.settings.gate = dict(aws.settings.gate, thresholds=LOW_THRESHOLDS)
    champion = serve_reference(aws)
    event = upload_with_test_split(aws, "with-test", extra={"test/NORMAL/broken.jpeg": eval_images(1)[0][1].read_bytes()[:400]})
    result = execute(start_state(aws, event), aws, train=fake_training(candidates["worse"]))
    assert result.status == "SUCCEEDED", result.state.get("error")
    ev, gate_out = result.state["evaluation"], result.state["gate"]
    # Both models on the same images; the broken file is a refused row, not a crash or a prediction.
    assert ev["evaluation_set"]["source"] == "dataset" and ev["evaluation_set"]["n"] == 2 * PER_CLASS
    assert ev["evaluation_set"]["refused"] == 1 and "broken.jpeg: corrupt_image" in ev["evaluation_set"]["refused_files"][0]
    comparison = ev["comparison"]
    assert comparison["n"] == 2 * PER_CLASS and comparison["metric"] == "roc_auc"
    assert comparison["in_service"] > 0.9 and comparison["difference"] < 0 and comparison["ci"][1] < 0
    assert not gate_out["approved"] and gate_out["evaluated"]
    assert "non-inferiority margin -0.01" in gate_out["reasons"][0]
    assert champion.model_version in gate_out["reasons"][0]
    assert pointer(aws).model_version == champion.model_version
    # The figures lie next to the model: every image, both models, the refused file with its code.
    rows = list(csv.DictReader(io.StringIO(aws.clients.s3.get_object(
        Bucket=ARTIFACTS, Key=ev["predictions_uri"].split("/", 3)[3])["Body"].read().decode())))
    assert len(rows) == 2 * PER_CLASS + 1
    assert [r["error_code"] for r in rows if r["key"].endswith("broken.jpeg")] == ["corrupt_image"]
    assert all(r["probability_candidate"] and r["probability_in_service"] for r in rows if not r["error_code"])
    report = json.loads(aws.clients.s3.get_object(Bucket=ARTIFACTS, Key=ev["report_uri"].split("/", 3)[3])["Body"].read())
    assert report["candidate"]["ci"]["roc_auc"][0] <= report["candidate"]["roc_auc"] <= report["candidate"]["ci"]["roc_auc"][1]
    package = aws.clients.sagemaker.describe_model_package(ModelPackageName=result.state["registration"]["model_package_arn"])
    assert package["ModelApprovalStatus"] == "Rejected"
    assert "judged on the evaluation set" in package["ModelPackageDescription"]
    message = result.state["notification"]["message"]
    assert "Evaluation metrics" in message and f"Against the model in service ({champion.model_version})" in message


@pytest.mark.slow
def test_an_equal_candidate_passes_non_inferiority(aws, candidates):  # noqa: F811
    aws.settings.gate = dict(aws.settings.gate, thresholds=LOW_THRESHOLDS)
    aws.settings.serving_image_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cxr-inference:latest"
    champion = serve_reference(aws)
    result = execute(start_state(aws, upload_with_test_split(aws, "equal")), aws,
                     train=fake_training(candidates["equal"]))
    comparison = result.state["evaluation"]["comparison"]
    assert comparison["difference"] == 0.0 and comparison["ci"] == [0.0, 0.0]
    assert comparison["mcnemar"]["candidate_only_correct"] == comparison["mcnemar"]["in_service_only_correct"] == 0
    assert result.state["gate"]["approved"], result.state["gate"]["reasons"]
    assert pointer(aws).model_version == "reference-retrained"
    assert pointer(aws).previous.model_version == champion.model_version
    package = aws.clients.sagemaker.describe_model_package(ModelPackageName=result.state["registration"]["model_package_arn"])
    container = package["InferenceSpecification"]["Containers"][0]
    assert container["ModelDataUrl"] == result.state["gate"]["model_uri"] and container["Image"].endswith("cxr-inference:latest")
    # Requiring a significant improvement rejects the same candidate.
    aws.settings.gate = dict(aws.settings.gate, require_improvement=True)
    serve_reference(aws)
    again = execute(start_state(aws, upload_with_test_split(aws, "equal-again")), aws,
                    train=fake_training(candidates["equal"]))
    assert not again.state["gate"]["approved"] and "not significantly better" in again.state["gate"]["reasons"][0]


def test_no_evaluation_set_is_labelled_validation_only(aws, candidates):  # noqa: F811
    from test_infra_functions import GOOD_FILES

    result = execute(start_state(aws, upload_fake(aws, "no-test", GOOD_FILES)), aws,
                     train=fake_training(candidates["worse"]))
    ev = result.state["evaluation"]
    assert ev["evaluation_set"] is None and ev["metrics"] is None and ev["comparison"] is None
    assert ev["judged_on"] == evaluate.VALIDATION_ONLY
    assert result.state["gate"]["judged_on"] == evaluate.VALIDATION_ONLY and not result.state["gate"]["evaluated"]


@pytest.mark.slow
def test_evaluate_probabilities_equal_the_lambda_handlers(aws, inference_app, tiny_bundle):  # noqa: F811
    """The same bytes through the Evaluate step's scoring and through the API handler."""
    from shared.predictor import OnnxPredictor

    images = eval_images(4)
    for rel, path in images:
        aws.clients.s3.put_object(Bucket=DATA, Key=f"sets/fixed/{rel}", Body=path.read_bytes())
    rows, _ = evaluate.score_set(aws.clients.s3, f"s3://{DATA}/sets/fixed/", [OnnxPredictor(read_bundle(tiny_bundle))])
    assert len(rows) == 8 and all(r.ok for r in rows)
    for row, (_, path) in zip(rows, images, strict=True):
        event = {"httpMethod": "POST", "path": "/predict", "resource": "/predict", "isBase64Encoded": True,
                 "headers": {"Content-Type": "image/jpeg"}, "body": base64.b64encode(path.read_bytes()).decode(),
                 "requestContext": {"requestId": "r", "stage": "prod"}}
        resp = inference_app.handler(event, None)
        assert resp["statusCode"] == 200, resp["body"]
        assert json.loads(resp["body"])["probability"] == pytest.approx(row.probabilities[0], abs=1e-6)


def test_paired_comparison_is_seeded_and_detects_a_worse_model():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(90)].astype(int)
    good = np.clip(0.7 * y + 0.3 * rng.random(150), 0, 1)
    bad = rng.random(150)
    c = paired_comparison(y, bad, good, 0.5, 0.5)
    assert c["ci"][1] < 0 and c["p_value"] < 0.01 and c["mcnemar"]["p_value"] < 0.01
    assert paired_comparison(y, bad, good, 0.5, 0.5) == c  # seeded: the same figures every time
    with pytest.raises(ValueError, match="not one of"):
        paired_comparison(y, bad, good, 0.5, 0.5, metric="auc")
