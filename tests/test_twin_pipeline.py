"""The local twin's flow on the real S3 server: every ending of a run, and one run per marker version.

One twin (SeaweedFS, moto, two execution environments) serves the whole module; each test
uploads its own small real dataset under its own name. Training uses the tiniest settings: what
is tested is the flow, not the model.
"""

from __future__ import annotations

import json

import pytest
from test_twin_support import LOW_GATE, TINY_HP, subset

from infra.functions.common import APPROVAL_TAG
from infra.functions.starter import initial_state
from infra.pipeline import PIPELINE
from infra.twin.trigger import MarkerWatcher
from infra.twin.twin import REFERENCE_REASON, Twin, TwinOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HAPPY_PATH = [s.name for s in PIPELINE.steps]


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_bundle_archive):
    state = tmp_path_factory.mktemp("twin-state")
    messages: list[str] = []
    t = Twin(TwinOptions(state_dir=state, reference=tiny_bundle_archive, hyperparameters=dict(TINY_HP),
                         gate_thresholds=dict(LOW_GATE), gate_require_improvement=False, concurrency=2,
                         echo_training=False), say=messages.append)
    t.messages = messages
    with t:
        yield t


def serving_version(twin: Twin) -> str:
    status, doc = twin.request("GET", "/health")
    assert status == 200, doc
    return doc["model"]["version"]


def predicted_version(twin: Twin, image) -> str:
    status, doc = twin.predict(image)
    assert status == 200, doc
    assert doc["label"] in ("NORMAL", "PNEUMONIA")
    return doc["model"]["version"]


def test_the_reference_model_serves_before_any_run(twin, originals):
    pointer = twin.pointer()
    assert pointer.reason == REFERENCE_REASON and pointer.model_uri == twin.reference_uri
    assert serving_version(twin) == pointer.model_version == "test-tiny-0001"
    assert predicted_version(twin, originals[0]) == "test-tiny-0001"


def test_upload_trains_gates_registers_promotes_and_serves(twin, tmp_path, originals):
    data = subset(tmp_path / "alpha", 30)
    up = twin.upload(data, "alpha")
    assert up.marker_written and up.uploaded == 60
    report = twin.handle(twin.marker_event("alpha"))
    ex = report.execution
    assert ex.status == "SUCCEEDED", ex.state.get("error")
    assert ex.path == HAPPY_PATH and report.outcome == "promoted"

    training, gate = ex.state["training"], ex.state["gate"]
    job = ex.state["run"]["job_name"]
    assert training["model_uri"] == f"s3://{twin.artifacts_bucket}/models/{job}/output/model.tar.gz"
    keys = {o["Key"] for o in twin.s3.list_objects_v2(Bucket=twin.artifacts_bucket,
                                                      Prefix=f"models/{job}/")["Contents"]}
    assert {f"models/{job}/output/model.tar.gz", f"models/{job}/output/output.tar.gz",
            f"models/{job}/output/model-quality.json"} <= keys
    assert (twin.logs / "training" / f"{job}.log").read_text().count("epoch=1 ") == 1

    packages = twin.control.packages()
    assert packages[-1]["ModelApprovalStatus"] == "Approved"
    assert packages[-1]["CustomerMetadataProperties"]["model_version"] == gate["model_version"]
    pointer = twin.pointer()
    assert pointer.model_version == gate["model_version"] and pointer.model_uri == training["model_uri"]
    assert "promoted" in ex.state["notification"]["subject"]

    assert twin.wait_for_model(gate["model_version"], timeout=60)
    assert predicted_version(twin, originals[-1]) == gate["model_version"]
    assert "no trained model" not in twin.in_service()


def test_the_same_marker_twice_starts_one_run(twin, tmp_path):
    runs_before = len(list((twin.state_dir / "executions").glob("*.json")))
    data = subset(tmp_path / "alpha", 30)  # the same files, uploaded again
    up = twin.upload(data, "alpha")
    assert not up.marker_written and up.uploaded == 0 and up.skipped == 60
    event = twin.marker_event("alpha")
    for _ in range(2):  # and the same event delivered twice, as EventBridge may
        report = twin.handle(event)
        assert report.outcome == "duplicate" and report.execution is None
        assert "promoted" in report.detail
    assert len(list((twin.state_dir / "executions").glob("*.json"))) == runs_before
    assert len(list((twin.logs / "training").glob("cxr-alpha-*.log"))) == 1


def test_a_class_of_unreadable_files_fails_the_run_and_the_model_keeps_serving(twin, tmp_path, originals):
    before = twin.pointer()
    data = subset(tmp_path / "broken", 20, only_broken=("NORMAL",))
    twin.upload(data, "broken")
    report = twin.handle(twin.marker_event("broken"))
    ex = report.execution
    assert ex.status == "FAILED" and report.outcome == "failed"
    assert ex.path == ["ValidateDataset", "TrainModel", "NotifyFailure"]
    assert "class NORMAL in 'train' has no readable images" in report.detail
    assert "AlgorithmError" in report.detail
    message = ex.state["notification"]["message"]
    assert "failed during training" in message and "The model in service is unchanged" in message
    assert twin.pointer() == before
    assert predicted_version(twin, originals[0]) == before.model_version


def test_a_marker_that_does_not_match_the_files_fails_validation(twin, originals):
    before = twin.pointer()
    marker = "datasets/alpha/_READY"
    manifest = json.loads(twin.s3.get_object(Bucket=twin.data_bucket, Key=marker)["Body"].read())
    manifest["counts"]["train"]["NORMAL"] += 5  # five images the marker promises but nobody uploaded
    twin.s3.put_object(Bucket=twin.data_bucket, Key=marker, Body=json.dumps(manifest).encode())
    report = twin.handle(twin.marker_event("alpha"))
    ex = report.execution
    assert ex.status == "FAILED" and ex.path == ["ValidateDataset", "NotifyFailure"]
    assert "does not match its _READY manifest" in report.detail
    assert twin.pointer() == before and serving_version(twin) == before.model_version
    assert predicted_version(twin, originals[0]) == before.model_version


def test_a_model_below_the_gate_is_rejected_and_not_promoted(twin, tmp_path, originals):
    before = twin.pointer()
    strict = {"roc_auc": 0.99, "accuracy": 0.99, "sensitivity": 0.99, "specificity": 0.99}
    twin.cfg = twin.cfg.with_overrides(gate_thresholds=strict)
    # A model that has barely moved from its random start.
    twin.o.hyperparameters = {**TINY_HP, "lr": "1e-7", "val-fraction": "0.4"}
    data = subset(tmp_path / "gamma", 40, offset=100, broken={"PNEUMONIA": 2})
    twin.upload(data, "gamma")
    report = twin.handle(twin.marker_event("gamma"))
    ex = report.execution
    assert ex.status == "SUCCEEDED" and report.outcome == "rejected"
    assert ex.path == [*HAPPY_PATH[:HAPPY_PATH.index("IsApproved") + 1], "NotifyRejected"]
    gate = ex.state["gate"]
    assert not gate["approved"] and any("below the required" in r for r in gate["reasons"])
    assert twin.control.packages()[-1]["ModelApprovalStatus"] == "Rejected"
    bucket, key = gate["model_uri"][5:].split("/", 1)
    tags = twin.s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    assert {"Key": APPROVAL_TAG, "Value": "Rejected"} in tags
    assert "rejected" in ex.state["notification"]["subject"]
    # The unreadable files are in the run record and the notification, each with its reason.
    assert gate["skipped_count"] == 2 and {s["file"] for s in gate["skipped"]} == {
        "train/PNEUMONIA/broken-000.jpeg", "train/PNEUMONIA/broken-001.jpeg"}
    record = twin.executions.get(ex.state["run"]["run_id"])
    assert record["output"]["gate"]["skipped_count"] == 2
    message = ex.state["notification"]["message"]
    assert "Training skipped 2 unreadable files:" in message and "train/PNEUMONIA/broken-001.jpeg: " in message
    assert twin.pointer() == before
    assert predicted_version(twin, originals[0]) == before.model_version


def test_the_watcher_emits_one_event_per_marker_version(twin, tmp_path):
    watcher = MarkerWatcher(twin.s3, twin.data_bucket)
    first = {e["detail"]["object"]["key"] for e in watcher.poll()}
    assert {"datasets/alpha/_READY", "datasets/broken/_READY", "datasets/gamma/_READY"} <= first
    assert watcher.poll() == []  # nothing new
    subset(tmp_path / "delta", 3)
    twin.upload(tmp_path / "delta", "delta")
    events = watcher.poll()
    assert [e["detail"]["object"]["key"] for e in events] == ["datasets/delta/_READY"]
    assert events[0]["detail"]["object"]["version-id"]  # the data bucket is versioned, as in the stack
    assert watcher.poll() == []
    # Two marker versions written within a second: two events, two runs, as S3 and the starter make in the cloud.
    marker = twin.s3.get_object(Bucket=twin.data_bucket, Key="datasets/delta/_READY")["Body"].read()
    for _ in range(2):
        twin.s3.put_object(Bucket=twin.data_bucket, Key="datasets/delta/_READY", Body=marker)
    events = watcher.poll()
    assert len(events) == 2 and len({e["detail"]["object"]["version-id"] for e in events}) == 2
    runs = {initial_state(e, twin.context().settings)["run"]["run_id"] for e in events}
    assert len(runs) == 2


def _restart_api(twin: Twin) -> None:
    """What starting the twin again does for serving: check the model, then cold-start the environments."""
    twin.gateway.stop()
    twin.ensure_model_in_service()
    twin.start_api()


def test_a_corrupt_promoted_archive_starts_and_serves_the_fallback(twin, tmp_path, originals):
    import dataclasses

    from shared.bundle import file_sha256

    good = twin.pointer()
    assert good.previous is not None and good.model_uri != twin.reference_uri  # a trained model, promoted
    bucket, _, key = good.model_uri[5:].partition("/")
    saved = tmp_path / "good.tar.gz"
    twin.s3.download_file(bucket, key, str(saved))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08 not a model " * 4000)
    twin.s3.upload_file(str(junk), bucket, key)
    ssm = twin.control.client("ssm")
    try:
        # Present, its checksum matching the pointer, but corrupt: the previous model serves.
        corrupt = dataclasses.replace(good, sha256=file_sha256(junk))
        ssm.put_parameter(Name=twin.pointer_parameter, Value=corrupt.to_json(), Type="String", Overwrite=True)
        _restart_api(twin)
        status, doc = twin.request("GET", "/health")
        assert status == 200 and doc["status"] == "fallback", doc
        assert doc["model"]["version"] == good.previous.model_version
        assert doc["fallback"]["promoted_version"] == good.model_version
        assert predicted_version(twin, originals[0]) == good.previous.model_version
        assert "fallback" in twin.in_service() and good.model_version in twin.in_service()
        assert twin.pointer() == corrupt  # still named first: the environments keep retrying it
        # The previous one gone too: the shipped reference model becomes the fallback.
        gone = dataclasses.replace(corrupt, previous=dataclasses.replace(good.previous, model_uri=(
            f"s3://{twin.artifacts_bucket}/models/deleted/model.tar.gz")))
        ssm.put_parameter(Name=twin.pointer_parameter, Value=gone.to_json(), Type="String", Overwrite=True)
        _restart_api(twin)
        status, doc = twin.request("GET", "/health")
        assert status == 200 and doc["status"] == "fallback" and doc["model"]["version"] == "test-tiny-0001"
        assert twin.pointer().previous.model_uri == twin.reference_uri
        assert twin.pointer().model_uri == good.model_uri
    finally:
        twin.s3.upload_file(str(saved), bucket, key)
        ssm.put_parameter(Name=twin.pointer_parameter, Value=good.to_json(), Type="String", Overwrite=True)
    assert twin.wait_for_model(good.model_version, timeout=90)  # repaired: the environments' retry finds it


def versioned_archive(tiny_bundle, root, version: str):
    import shutil

    from shared.bundle import BUNDLE_JSON, pack

    folder = root / version
    shutil.copytree(tiny_bundle, folder)
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    meta["model_version"] = version
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    return pack(folder, root / f"{version}.tar.gz")


def promote_through_the_pipeline(twin, tmp_path, archive, name: str):
    """A run of the step list whose training job leaves ``archive`` (what is tested is promotion)."""
    from infra.pipeline import execute

    def train(state, ctx):
        key = f"models/{state['run']['job_name']}/output/model.tar.gz"
        ctx.clients.s3.upload_file(str(archive), twin.artifacts_bucket, key)
        return {"job_name": state["run"]["job_name"], "status": "Completed",
                "model_uri": f"s3://{twin.artifacts_bucket}/{key}", "training_seconds": 1, "billable_seconds": 1}

    twin.upload(subset(tmp_path / name, 2, offset=300), name)
    from infra.functions.starter import initial_state

    ex = execute(initial_state(twin.marker_event(name), twin.context().settings), twin.context(), train=train)
    assert ex.state.get("promotion"), ex.state.get("error") or ex.state["gate"]["reasons"]
    return ex


def test_rollback_round_trip_the_api_serves_the_model_rolled_back_to(twin, tmp_path, tiny_bundle, originals, capsys):
    from infra import promote

    twin.cfg = twin.cfg.with_overrides(gate_thresholds=dict(LOW_GATE))
    promote_through_the_pipeline(twin, tmp_path, versioned_archive(tiny_bundle, tmp_path, "model-a"), "roll-a")
    promote_through_the_pipeline(twin, tmp_path, versioned_archive(tiny_bundle, tmp_path, "model-b"), "roll-b")
    assert twin.pointer().model_version == "model-b" and twin.wait_for_model("model-b")
    endpoints = ["--stack-name", twin.cfg.stack_name, "--state-dir", str(twin.state_dir),
                 "--s3-endpoint-url", twin.s3_server.endpoint, "--control-endpoint-url", twin.control.endpoint]
    assert promote.main([*endpoints, "list"]) == 0
    listed = capsys.readouterr().out
    assert "* model-b" in listed and "model-a" in listed
    # A tampered archive is refused before anything moves.
    a_uri = next(m for m in promote.approved_models(twin.control.client("sagemaker"), twin.package_group)
                 if m.model_version == "model-a").model_uri
    bucket, key = a_uri[5:].split("/", 1)
    original = twin.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    twin.s3.put_object(Bucket=bucket, Key=key, Body=original + b"\0")
    assert promote.main([*endpoints, "to", "model-a"]) == 1
    assert "SHA-256" in capsys.readouterr().err and twin.pointer().model_version == "model-b"
    twin.s3.put_object(Bucket=bucket, Key=key, Body=original)
    assert promote.main([*endpoints, "to", "model-a"]) == 0
    assert twin.pointer().model_version == "model-a" and twin.pointer().previous.model_version == "model-b"
    assert twin.wait_for_model("model-a") and predicted_version(twin, originals[0]) == "model-a"
    assert promote.main([*endpoints, "previous"]) == 0  # and back again
    assert twin.wait_for_model("model-b")


def test_batch_over_a_prefix_with_a_corrupt_file(twin, capsys):
    import csv
    import io

    from test_twin_support import DATA_224

    from infra import batch_predict

    images = sorted((DATA_224 / "test" / "NORMAL").iterdir())[:3] + sorted((DATA_224 / "test" / "PNEUMONIA").iterdir())[:3]
    for path in images:
        twin.s3.put_object(Bucket=twin.data_bucket, Key=f"incoming/day1/{path.name}", Body=path.read_bytes())
    twin.s3.put_object(Bucket=twin.data_bucket, Key="incoming/day1/zz-corrupt.jpeg", Body=images[0].read_bytes()[:300])
    twin.s3.put_object(Bucket=twin.data_bucket, Key="incoming/day1/notes.txt", Body=b"not an image")
    code = batch_predict.main(["--stack-name", twin.cfg.stack_name, "--twin", "--state-dir", str(twin.state_dir),
                               "--input", f"s3://{twin.data_bucket}/incoming/day1/",
                               "--output", f"s3://{twin.data_bucket}/batch/day1.csv"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 8 rows" in out and "6 scored, 2 refused" in out and "1/1 batches done" in out
    body = twin.s3.get_object(Bucket=twin.data_bucket, Key="batch/day1.csv")["Body"].read().decode()
    rows = {r["key"].rsplit("/", 1)[1]: r for r in csv.DictReader(io.StringIO(body))}
    version = twin.pointer().model_version
    assert rows["zz-corrupt.jpeg"]["error_code"] == "corrupt_image" and rows["zz-corrupt.jpeg"]["probability"] == ""
    assert rows["notes.txt"]["error_code"] and rows["notes.txt"]["label"] == ""
    for path in images:
        r = rows[path.name]
        assert r["model_version"] == version and r["label"] in ("NORMAL", "PNEUMONIA") and 0 <= float(r["probability"]) <= 1
        assert (r["label"] == "PNEUMONIA") == (float(r["probability"]) >= float(r["threshold"]))
    # The parts the fan-out wrote are gone; only the CSV remains.
    assert [o["Key"] for o in twin.s3.list_objects_v2(Bucket=twin.data_bucket, Prefix="batch/")["Contents"]] == ["batch/day1.csv"]
