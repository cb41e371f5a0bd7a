"""The pipeline's functions and the step list, run in-process against moto (S3, SSM, SNS,
SageMaker, Step Functions): the same code the state machine's Lambdas and the local twin run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import boto3  # noqa: E402
import moto  # noqa: E402,F401
import pytest

from infra.config import load  # noqa: E402
from infra.functions import evaluate, gate, notify, register, starter, validate_dataset  # noqa: E402
from infra.functions.common import (  # noqa: E402
    APPROVAL_TAG,
    UNPROMOTED,
    BundleRejected,
    Clients,
    DatasetInvalid,
    Settings,
    StepContext,
    failure_reason,
    run_id,
)
from infra.pipeline import PIPELINE, STEPS, execute  # noqa: E402
from shared.bundle import ARCHIVE_NAME, BUNDLE_JSON, pack  # noqa: E402
from shared.dataset import build_manifest, scan_relpaths  # noqa: E402
from shared.pointer import ModelPointer  # noqa: E402

REGION = "us-east-1"
DATA, ARTIFACTS = "cxr-data-test", "cxr-artifacts-test"
POINTER = "/CxrTest/promoted-model"
GROUP = "CxrTest-models"
GOOD = {"accuracy": 0.93, "sensitivity": 0.96, "specificity": 0.88, "precision": 0.92, "f1": 0.94, "roc_auc": 0.97}


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        for bucket in (DATA, ARTIFACTS):
            s3.create_bucket(Bucket=bucket)
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        ssm = boto3.client("ssm", region_name=REGION)
        ssm.put_parameter(Name=POINTER, Value=UNPROMOTED, Type="String")
        sns = boto3.client("sns", region_name=REGION)
        topic = sns.create_topic(Name="cxr-test")["TopicArn"]
        sagemaker = boto3.client("sagemaker", region_name=REGION)
        sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
        sfn = boto3.client("stepfunctions", region_name=REGION)
        machine = sfn.create_state_machine(
            name="cxr-test", definition=json.dumps({"StartAt": "A", "States": {"A": {"Type": "Succeed"}}}),
            roleArn="arn:aws:iam::123456789012:role/cxr-test-sfn")["stateMachineArn"]
        settings = Settings(data_bucket=DATA, artifacts_bucket=ARTIFACTS, pointer_parameter=POINTER, topic_arn=topic,
                            model_package_group=GROUP, state_machine_arn=machine, gate=load().gate_settings())
        yield StepContext(settings, Clients(s3=s3, ssm=ssm, sns=sns, sagemaker=sagemaker, stepfunctions=sfn))


def upload_dataset(ctx, name: str, files: dict[str, int], manifest_files: dict[str, int] | None = None):
    """Put ``split/CLASS`` -> count images and a _READY marker; returns the marker event."""
    s3 = ctx.clients.s3
    rels = []
    for folder, count in files.items():
        for i in range(count):
            rel = f"{folder}/IM-{i:04d}-0001.jpeg"
            s3.put_object(Bucket=DATA, Key=f"datasets/{name}/{rel}", Body=b"\xff\xd8 not decoded by validation")
            rels.append(rel)
    if manifest_files is not None:
        rels = [f"{folder}/IM-{i:04d}-0001.jpeg" for folder, count in manifest_files.items() for i in range(count)]
    manifest = build_manifest(name, scan_relpaths(rels), "2026-01-01T00:00:00Z")
    key = f"datasets/{name}/_READY"
    resp = s3.put_object(Bucket=DATA, Key=key, Body=json.dumps(manifest).encode())
    return starter.marker_event(DATA, key, version_id=resp.get("VersionId"), etag=resp["ETag"])


GOOD_FILES = {"train/NORMAL": 3, "train/PNEUMONIA": 4, "val/NORMAL": 1, "val/PNEUMONIA": 1, "train/COVID": 2}


def start_state(ctx, event):
    state = starter.initial_state(event, ctx.settings)
    assert state is not None
    return state


# ---------------------------------------------------------------- starting a run


def test_good_dataset_starts_one_run_and_validates(aws):
    event = upload_dataset(aws, "kaggle-2026", GOOD_FILES)
    started = starter.run(event, aws)
    assert started["status"] == "started"
    executions = aws.clients.stepfunctions.list_executions(stateMachineArn=aws.settings.state_machine_arn)["executions"]
    assert [e["name"] for e in executions] == [started["run_id"]]

    state = start_state(aws, event)
    assert state["run"]["job_name"] == started["run_id"]
    assert state["run"]["checkpoint_uri"] == f"s3://{ARTIFACTS}/checkpoints/{started['run_id']}/"
    result = validate_dataset.run(state, aws)
    assert result["counts"] == {"train": {"NORMAL": 3, "PNEUMONIA": 4}, "val": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert result["ignored_classes"] == {"train/COVID": 2}
    assert [c["ChannelName"] for c in result["channels"]] == ["train", "val"]
    assert result["channels"][0]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{DATA}/datasets/kaggle-2026/train/"


def test_the_same_event_twice_starts_one_execution(aws):
    event = upload_dataset(aws, "dup", GOOD_FILES)
    sfn = aws.clients.stepfunctions
    first, second = starter.run(event, aws), starter.run(event, aws)
    assert first["status"] == "started"
    # While the first run is going, Step Functions answers the same name and input with that run.
    assert second["run_id"] == first["run_id"]
    assert second["status"] == "duplicate" or second["execution_arn"] == first["execution_arn"]
    # Once it has ended, the name is taken: ExecutionAlreadyExists, and nothing starts.
    sfn.stop_execution(executionArn=first["execution_arn"])
    third = starter.run(event, aws)
    assert third == {"status": "duplicate", "run_id": first["run_id"]}
    assert len(sfn.list_executions(stateMachineArn=aws.settings.state_machine_arn)["executions"]) == 1


def test_a_new_marker_version_is_a_new_run(aws):
    first = starter.run(upload_dataset(aws, "again", GOOD_FILES), aws)
    second = starter.run(upload_dataset(aws, "again", GOOD_FILES), aws)
    assert second["status"] == "started" and second["run_id"] != first["run_id"]


def test_daily_cap_refuses_records_and_notifies(aws):
    ctx = StepContext(dataclasses.replace(aws.settings, max_runs_per_day=2), aws.clients)
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="cxr-test-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    aws.clients.sns.subscribe(TopicArn=ctx.settings.topic_arn, Protocol="sqs", Endpoint=queue_arn)

    events = [upload_dataset(ctx, name, GOOD_FILES) for name in ("day-a", "day-b", "day-c")]
    first, second = starter.run(events[0], ctx), starter.run(events[1], ctx)
    assert first["status"] == second["status"] == "started"
    third = starter.run(events[2], ctx)
    assert third["status"] == "refused"
    assert "2 training runs already started today" in third["reason"] and "maxTrainingRunsPerDay is 2" in third["reason"]
    executions = ctx.clients.stepfunctions.list_executions(stateMachineArn=ctx.settings.state_machine_arn)["executions"]
    assert sorted(e["name"] for e in executions) == sorted([first["run_id"], second["run_id"]])
    # the reason is recorded in the artifacts bucket and sent to the topic
    key = f"runs/refused/{third['run_id']}.json"
    assert third["record"] == f"s3://{ARTIFACTS}/{key}"
    record = json.loads(ctx.clients.s3.get_object(Bucket=ARTIFACTS, Key=key)["Body"].read())
    assert record["reason"] == third["reason"] and record["run"]["dataset"] == "day-c"
    assert record["runs_started_today"] == 2 and record["max_runs_per_day"] == 2
    [message] = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    body = json.loads(message["Body"])
    assert body["Message"] == third["reason"] and "daily cap" in body["Subject"]
    # a repeated event for a run that already started is a duplicate, not a refusal
    assert starter.run(events[0], ctx)["status"] in ("duplicate", "started")
    # without a cap the same marker starts
    assert starter.run(events[2], aws)["status"] == "started"


def test_run_names_fit_step_functions_and_sagemaker():
    rid = run_id("A very long dataset name with spaces & symbols (v2) " * 3, "v:" + "x" * 200)
    assert len(rid) <= 63 and rid.startswith("cxr-")
    import re

    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", rid)
    assert run_id("ds", "v:1") == run_id("ds", "v:1") != run_id("ds", "v:2")


def test_image_uploads_and_nested_markers_are_ignored(aws):
    for key in ("datasets/x/train/NORMAL/a.jpeg", "datasets/x/train/_READY", "other/x/_READY"):
        assert starter.run(starter.marker_event(DATA, key, version_id="v1"), aws) == {"status": "ignored"}


# ---------------------------------------------------------------- validation failures


def test_dataset_missing_a_class_is_refused(aws):
    event = upload_dataset(aws, "no-pneumonia", {"train/NORMAL": 3})
    with pytest.raises(DatasetInvalid, match="PNEUMONIA"):
        validate_dataset.run(start_state(aws, event), aws)


def test_marker_with_a_wrong_manifest_is_refused(aws):
    event = upload_dataset(aws, "half-uploaded", {"train/NORMAL": 3, "train/PNEUMONIA": 2},
                           manifest_files={"train/NORMAL": 3, "train/PNEUMONIA": 4})
    with pytest.raises(DatasetInvalid, match="does not match its _READY manifest"):
        validate_dataset.run(start_state(aws, event), aws)


def test_marker_that_is_not_json_is_refused(aws):
    resp = aws.clients.s3.put_object(Bucket=DATA, Key="datasets/junk/_READY", Body=b"ready!")
    event = starter.marker_event(DATA, "datasets/junk/_READY", version_id=resp["VersionId"])
    with pytest.raises(DatasetInvalid, match="not valid JSON"):
        validate_dataset.run(start_state(aws, event), aws)


# ---------------------------------------------------------------- whole runs through the step list


@pytest.fixture(scope="session")
def bundle_factory(tiny_bundle, tmp_path_factory):
    """model.tar.gz archives that differ only in their validation metrics and version."""
    root = tmp_path_factory.mktemp("bundles")

    def make(version: str, metrics: dict) -> Path:
        folder = root / version
        if not folder.exists():
            shutil.copytree(tiny_bundle, folder)
            meta = json.loads((folder / BUNDLE_JSON).read_text())
            meta["model_version"] = version
            meta["metrics"]["validation"] = metrics
            (folder / BUNDLE_JSON).write_text(json.dumps(meta))
        return pack(folder, root / f"{version}-{ARCHIVE_NAME}")

    return make


def fake_training(archive: Path):
    """Stands in for the SageMaker job: uploads the bundle where the job would leave it."""

    def train(state, ctx):
        job = state["run"]["job_name"]
        key = f"models/{job}/output/model.tar.gz"
        ctx.clients.s3.upload_file(str(archive), ARTIFACTS, key)
        return {"job_name": job, "status": "Completed", "model_uri": f"s3://{ARTIFACTS}/{key}",
                "training_seconds": 60, "billable_seconds": 20}

    return train


def pointer(ctx) -> ModelPointer | None:
    return gate.promoted_pointer(ctx.clients.ssm, POINTER)


def run_pipeline(ctx, name: str, archive: Path):
    event = upload_dataset(ctx, name, GOOD_FILES)
    return execute(start_state(ctx, event), ctx, train=fake_training(archive))


def test_step_list_order_and_kinds():
    assert [s.name for s in STEPS] == ["ValidateDataset", "TrainModel", "EvaluateModel", "QualityGate", "RegisterModel",
                                       "IsApproved", "PromoteModel", "NotifyPromoted"]
    assert [s.kind for s in STEPS] == ["lambda", "training", "lambda", "lambda", "lambda", "choice", "lambda", "lambda"]
    assert all(callable(s.fn) for s in STEPS if s.kind != "training")
    assert PIPELINE.lambda_modules() == ["validate_dataset", "evaluate", "gate", "register", "promote", "notify"]
    # A failed run names the step it was in, in the list's order.
    assert [k for k, _ in PIPELINE.result_order()] == ["dataset", "training", "evaluation", "gate", "registration",
                                                      "promotion", "notification"]
    assert notify.failed_during({"dataset": {}, "training": {}}) == "evaluating the model"


def test_first_good_model_is_registered_approved_and_promoted(aws, bundle_factory):
    result = run_pipeline(aws, "first", bundle_factory("m-good", GOOD))
    assert result.status == "SUCCEEDED", result.state.get("error")
    assert result.path[-2:] == ["PromoteModel", "NotifyPromoted"]
    state = result.state
    assert state["gate"]["approved"] and state["gate"]["in_service"] is None
    current = pointer(aws)
    assert current.model_version == "m-good" and current.model_uri == state["gate"]["model_uri"]
    assert current.sha256 == state["gate"]["sha256"]
    package = aws.clients.sagemaker.describe_model_package(ModelPackageName=state["registration"]["model_package_arn"])
    assert package["ModelApprovalStatus"] == "Approved"
    assert package["CustomerMetadataProperties"]["metric:roc_auc"] == "0.970000"
    assert package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"] == state["gate"]["metrics_uri"]
    quality = json.loads(aws.clients.s3.get_object(Bucket=ARTIFACTS, Key=state["gate"]["metrics_uri"].split("/", 3)[3])["Body"].read())
    assert quality["binary_classification_metrics"]["auc"]["value"] == 0.97
    assert state["notification"]["outcome"] == "promoted" and "m-good" in state["notification"]["subject"]


def test_rejected_model_is_registered_rejected_tagged_and_not_served(aws, bundle_factory):
    run_pipeline(aws, "first", bundle_factory("m-good", GOOD))
    weak = dict(GOOD, sensitivity=0.70, roc_auc=0.80)
    result = run_pipeline(aws, "weak", bundle_factory("m-weak", weak))
    assert result.status == "SUCCEEDED"
    assert result.path[-2:] == ["IsApproved", "NotifyRejected"]
    state = result.state
    assert not state["gate"]["approved"]
    assert any("sensitivity 0.7000 is below" in r for r in state["gate"]["reasons"])
    assert pointer(aws).model_version == "m-good"
    assert state["registration"]["approval_status"] == "Rejected"
    key = state["gate"]["model_uri"].split("/", 3)[3]
    tags = aws.clients.s3.get_object_tagging(Bucket=ARTIFACTS, Key=key)["TagSet"]
    assert {"Key": APPROVAL_TAG, "Value": "Rejected"} in tags
    assert state["notification"]["outcome"] == "rejected"
    assert "unchanged" in state["notification"]["message"] and "m-good" in state["notification"]["message"]


def test_model_that_beats_the_one_in_service_is_promoted(aws, bundle_factory):
    run_pipeline(aws, "first", bundle_factory("m-good", GOOD))
    better = run_pipeline(aws, "better", bundle_factory("m-better", dict(GOOD, roc_auc=0.985)))
    assert better.status == "SUCCEEDED" and better.state["gate"]["approved"]
    assert better.state["gate"]["in_service"]["model_version"] == "m-good"
    assert pointer(aws).model_version == "m-better"
    assert better.state["promotion"]["previous_model_version"] == "m-good"


def test_without_an_evaluation_set_the_gate_falls_back_to_validation_and_says_so(aws, bundle_factory):
    aws.settings.gate = dict(aws.settings.gate, require_improvement=True)
    run_pipeline(aws, "first", bundle_factory("m-good", GOOD))
    worse = run_pipeline(aws, "worse", bundle_factory("m-worse", dict(GOOD, roc_auc=0.95)))
    gate_out = worse.state["gate"]
    assert worse.status == "SUCCEEDED" and not gate_out["approved"]
    assert gate_out["reasons"] == ["roc_auc 0.9500 does not beat the model in service (m-good: 0.9700)"]
    assert not gate_out["evaluated"] and gate_out["judged_on"].startswith("its own validation split only")
    assert "Judged on its own validation split only" in worse.state["notification"]["message"]
    assert "Validation metrics:" in worse.state["notification"]["message"]
    package = aws.clients.sagemaker.describe_model_package(ModelPackageName=worse.state["registration"]["model_package_arn"])
    assert "judged on its own validation split only" in package["ModelPackageDescription"]
    assert package["CustomerMetadataProperties"]["judged_on"].startswith("its own validation split only")
    assert pointer(aws).model_version == "m-good"


def test_failed_training_job_notifies_and_leaves_the_model_in_service(aws, bundle_factory):
    run_pipeline(aws, "first", bundle_factory("m-good", GOOD))

    class TrainingJobFailed(Exception):
        pass

    def failing(state, ctx):
        raise TrainingJobFailed("AlgorithmError: CUDA out of memory (exit code 1)")

    event = upload_dataset(aws, "oom", GOOD_FILES)
    result = execute(start_state(aws, event), aws, train=failing)
    assert result.status == "FAILED"
    assert result.path == ["ValidateDataset", "TrainModel", "NotifyFailure"]
    assert result.state["notification"]["outcome"] == "failed"
    message = result.state["notification"]["message"]
    assert "failed during training" in message and "CUDA out of memory" in message
    assert "m-good" in message
    assert pointer(aws).model_version == "m-good"


def test_invalid_dataset_takes_the_failure_path(aws, bundle_factory):
    event = upload_dataset(aws, "broken", {"train/NORMAL": 2})
    result = execute(start_state(aws, event), aws, train=fake_training(bundle_factory("never", GOOD)))
    assert result.status == "FAILED" and result.path == ["ValidateDataset", "NotifyFailure"]
    assert result.state["error"]["Error"] == "DatasetInvalid"
    assert "validating the dataset" in result.state["notification"]["subject"]
    assert pointer(aws) is None


def test_failure_reason_reads_sagemaker_and_lambda_errors():
    sagemaker_cause = {"TrainingJobName": "cxr-x-1", "TrainingJobStatus": "Failed",
                       "FailureReason": "CapacityError: Unable to provision requested ML compute capacity"}
    assert failure_reason({"Error": "States.TaskFailed", "Cause": json.dumps(sagemaker_cause)}) == \
        "training job cxr-x-1 failed: CapacityError: Unable to provision requested ML compute capacity"
    lambda_cause = {"errorMessage": "dataset x: class PNEUMONIA ...", "errorType": "DatasetInvalid"}
    assert failure_reason({"Error": "DatasetInvalid", "Cause": json.dumps(lambda_cause)}).startswith("DatasetInvalid: dataset x")
    assert failure_reason({"Error": "States.Timeout", "Cause": ""}) == "States.Timeout"


def test_evaluation_rejects_an_archive_that_is_not_a_bundle(aws):
    aws.clients.s3.put_object(Bucket=ARTIFACTS, Key="models/j/output/model.tar.gz", Body=b"not a tarball")
    state = {"run": {"dataset": "d", "job_name": "j"},
             "training": {"job_name": "j", "model_uri": f"s3://{ARTIFACTS}/models/j/output/model.tar.gz"}}
    with pytest.raises(BundleRejected, match="not a valid bundle"):
        evaluate.run(state, aws)


def test_register_metadata_fits_the_registry_alphabet():
    state = {"run": {"dataset": "kaggle (v2)", "job_name": "cxr-k-1"}, "dataset": {"uri": "s3://b/datasets/k/"},
             "training": {"job_name": "cxr-k-1"},
             "gate": {"approved": False, "reasons": ["roc_auc 0.8 < 0.9 (needs more data)"] * 10,
                      "metrics": GOOD, "model_uri": "s3://b/models/k/model.tar.gz", "sha256": "0" * 64,
                      "model_version": "v1", "in_service": None}}
    import re

    props = register.metadata(state)
    assert all(re.fullmatch(r"[\w\s.:/=+\-@]{1,256}", v) for v in props.values()), props
    assert len(props) <= 50


def test_notify_subject_is_short_ascii():
    state = {"run": {"dataset": "Données-été" * 10, "run_id": "r"}, "error": {"Error": "X", "Cause": "boom"}}
    subject, _ = notify.compose(state, None)
    assert len(subject) <= 100 and subject.isascii()


def test_promotion_keeps_the_previous_model_as_fallback():
    from shared.pointer import ModelPointer

    old = ModelPointer("s3://b/models/a/model.tar.gz", "a" * 64, "model-a", "2026-11-01T00:00:00Z")
    new = ModelPointer("s3://b/models/b/model.tar.gz", "b" * 64, "model-b", "2026-11-02T00:00:00Z")
    chained = old.succeeded_by(new)
    again = ModelPointer.from_json(chained.to_json())
    assert again.model_version == "model-b"
    assert again.previous.model_version == "model-a" and again.previous.sha256 == "a" * 64
    assert again.previous.previous is None  # one level only
    assert ModelPointer.from_json(new.succeeded_by(again).to_json()).previous.model_version == "model-b"
