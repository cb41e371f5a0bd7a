"""Where the inference Lambda gets its model: paths, archives, S3, and the promoted pointer in SSM (moto)."""

from __future__ import annotations

import json
import shutil

import boto3
import pytest
from conftest import ROOT
from moto import mock_aws
from test_inference_support import api_event, call, configure

from shared.bundle import ARCHIVE_NAME, BUNDLE_JSON, file_sha256, pack
from shared.pointer import ModelPointer

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")

BUCKET = "cxr-models-test"
PARAM = "/cxr/test/promoted-model"


@pytest.fixture(scope="module")
def second_archive(tiny_bundle, tmp_path_factory):
    """The tiny bundle again under another model version: what a later promotion would point at."""
    folder = tmp_path_factory.mktemp("second-bundle") / "bundle"
    shutil.copytree(tiny_bundle, folder)
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    meta["model_version"] = "test-tiny-0002"
    meta["provenance"]["finished_at"] = "2026-02-02T00:00:00Z"
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    return pack(folder, folder.parent / ARCHIVE_NAME)


@pytest.fixture
def jpeg(originals) -> bytes:
    return originals[2].read_bytes()


@pytest.fixture
def aws(tiny_bundle_archive, second_archive):
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.upload_file(str(tiny_bundle_archive), BUCKET, "models/v1/model.tar.gz")
        s3.upload_file(str(second_archive), BUCKET, "models/v2/model.tar.gz")
        yield {"s3": s3, "ssm": boto3.client("ssm")}


def promote(aws, key: str, sha256: str, version: str = "v") -> None:
    pointer = ModelPointer(model_uri=f"s3://{BUCKET}/{key}", sha256=sha256, model_version=version,
                           promoted_at="2026-11-26T10:00:00Z", reason="test")
    aws["ssm"].put_parameter(Name=PARAM, Value=pointer.to_json(), Type="String", Overwrite=True)


def version_served(app, jpeg) -> str:
    reply = call(app, api_event(body=jpeg, content_type="image/jpeg"))
    assert reply.status == 200, reply
    return reply.json()["model"]["version"]


class CountingS3:
    """Wraps a boto3 S3 client to count downloads: the model must be fetched once per cold start."""

    def __init__(self):
        self.client = boto3.client("s3")
        self.downloads: list[str] = []

    def download_file(self, bucket, key, filename):
        self.downloads.append(key)
        return self.client.download_file(bucket, key, filename)


# -- local forms ----------------------------------------------------------------------------------


def test_local_archive_and_file_uri(monkeypatch, inference_app, tiny_bundle_archive, tmp_path, jpeg):
    for uri in (str(tiny_bundle_archive), f"file://{tiny_bundle_archive}"):
        configure(monkeypatch, inference_app, uri, tmp_path / "cache")
        assert version_served(inference_app, jpeg) == "test-tiny-0001"
        health = call(inference_app, api_event("GET", "/health")).json()["model"]
        assert health["sha256"] == file_sha256(tiny_bundle_archive)
        assert health["source"] == "local"
    assert tiny_bundle_archive.exists()  # a local archive is unpacked, never removed


def test_model_loads_at_init_when_configured(tiny_bundle, tmp_path):
    import subprocess
    import sys

    code = ("import os, json; from inference_lambda import app; m = app.store.current; "
            "print(json.dumps({'loaded': m is not None, 'version': m and m.bundle.version, "
            "'torch': 'torch' in __import__('sys').modules}))")
    env = {"MODEL_URI": str(tiny_bundle), "MODEL_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "AWS_DEFAULT_REGION": "us-east-1", "POWERTOOLS_METRICS_NAMESPACE": "CxrTests"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"loaded": True, "version": "test-tiny-0001", "torch": False}


# -- S3 and the SSM pointer -------------------------------------------------------------------------


def test_s3_uri_is_downloaded_once(monkeypatch, inference_app, aws, tmp_path, jpeg):
    store = configure(monkeypatch, inference_app, f"s3://{BUCKET}/models/v1/model.tar.gz", tmp_path / "cache")
    counting = CountingS3()
    monkeypatch.setattr(store, "_s3", counting)
    for _ in range(3):
        assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert counting.downloads == ["models/v1/model.tar.gz"]
    assert not list((tmp_path / "cache").rglob(ARCHIVE_NAME))  # unpacked, then the archive is dropped
    assert len(list((tmp_path / "cache").rglob(BUNDLE_JSON))) == 1


def test_missing_s3_object_is_503(monkeypatch, inference_app, aws, tmp_path, jpeg):
    configure(monkeypatch, inference_app, f"s3://{BUCKET}/models/nope/model.tar.gz", tmp_path / "cache")
    reply = call(inference_app, api_event(body=jpeg, content_type="image/jpeg"))
    assert reply.status == 503 and reply.json()["error"]["code"] == "model_unavailable"
    assert "retry-after" in reply.headers


def test_ssm_pointer_serves_the_promoted_model(monkeypatch, inference_app, aws, tiny_bundle_archive, tmp_path, jpeg):
    promote(aws, "models/v1/model.tar.gz", file_sha256(tiny_bundle_archive), "test-tiny-0001")
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache")
    counting = CountingS3()
    monkeypatch.setattr(store, "_s3", counting)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert counting.downloads == ["models/v1/model.tar.gz"]
    model = call(inference_app, api_event("GET", "/health")).json()["model"]
    assert model["source"] == "ssm-pointer"
    assert BUCKET not in json.dumps(model) and PARAM not in json.dumps(model)  # /health is open to anyone
    assert model["sha256"] == file_sha256(tiny_bundle_archive)
    assert model["promoted_at"] == "2026-11-26T10:00:00Z"


def test_checksum_mismatch_is_503(monkeypatch, inference_app, aws, tmp_path, jpeg):
    promote(aws, "models/v1/model.tar.gz", "0" * 64)
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", retry_seconds=5)
    reply = call(inference_app, api_event(body=jpeg, content_type="image/jpeg"))
    assert reply.status == 503, reply
    assert reply.json()["error"]["code"] == "model_unavailable"
    assert "SHA-256" in store.last_error and BUCKET not in reply.text
    assert reply.headers["retry-after"] == "5"
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # nothing untrusted is left in /tmp


@pytest.mark.parametrize("value", ["not json", json.dumps({"model_uri": "s3://b/k"}),
                                   json.dumps({"model_uri": "ftp://x", "sha256": "a" * 64,
                                               "model_version": "v", "promoted_at": "t"})])
def test_bad_pointer_is_503(monkeypatch, inference_app, aws, tmp_path, jpeg, value):
    aws["ssm"].put_parameter(Name=PARAM, Value=value, Type="String", Overwrite=True)
    configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache")
    assert call(inference_app, api_event(body=jpeg, content_type="image/jpeg")).status == 503


def test_missing_pointer_parameter_is_503(monkeypatch, inference_app, aws, tmp_path):
    store = configure(monkeypatch, inference_app, "ssm:/cxr/test/absent", tmp_path / "cache")
    reply = call(inference_app, api_event("GET", "/health"))
    assert reply.status == 503 and "SSM" in store.last_error


def test_pointer_change_swaps_the_model_without_redeploy(monkeypatch, inference_app, aws, tiny_bundle_archive,
                                                         second_archive, tmp_path, jpeg):
    promote(aws, "models/v1/model.tar.gz", file_sha256(tiny_bundle_archive))
    configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", pointer_ttl_seconds=0)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    first_dirs = set((tmp_path / "cache").iterdir())
    promote(aws, "models/v2/model.tar.gz", file_sha256(second_archive))
    assert version_served(inference_app, jpeg) == "test-tiny-0002"
    health = call(inference_app, api_event("GET", "/health")).json()["model"]
    assert health["version"] == "test-tiny-0002" and health["trained_at"] == "2026-02-02T00:00:00Z"
    assert not (first_dirs & set((tmp_path / "cache").iterdir()))  # the old model's files are freed


def test_pointer_is_reread_only_after_its_ttl(monkeypatch, inference_app, aws, tiny_bundle_archive, second_archive,
                                             tmp_path, jpeg):
    promote(aws, "models/v1/model.tar.gz", file_sha256(tiny_bundle_archive))
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", pointer_ttl_seconds=3600)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    promote(aws, "models/v2/model.tar.gz", file_sha256(second_archive))
    assert version_served(inference_app, jpeg) == "test-tiny-0001"  # within the TTL: the cached pointer
    store._ssm.clear_cache()  # what the TTL running out does
    assert version_served(inference_app, jpeg) == "test-tiny-0002"


def test_bad_promotion_keeps_the_model_in_service(monkeypatch, inference_app, aws, tiny_bundle_archive,
                                                  second_archive, tmp_path, jpeg):
    promote(aws, "models/v1/model.tar.gz", file_sha256(tiny_bundle_archive))
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", pointer_ttl_seconds=0)
    counting = CountingS3()
    monkeypatch.setattr(store, "_s3", counting)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    promote(aws, "models/v2/model.tar.gz", "f" * 64)  # checksum will not match
    for _ in range(3):
        assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert counting.downloads == ["models/v1/model.tar.gz", "models/v2/model.tar.gz"]  # the bad one tried once
    aws["ssm"].delete_parameter(Name=PARAM)  # SSM trouble later on: keep serving
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    promote(aws, "models/v2/model.tar.gz", file_sha256(second_archive))  # fixed promotion
    assert version_served(inference_app, jpeg) == "test-tiny-0002"


# -- the last good model ----------------------------------------------------------------------------


def promote_over(aws, key: str, sha256: str, version: str, previous: tuple[str, str, str]) -> None:
    """A pointer naming ``key`` whose ``previous`` is (key, sha256, version), as promotion writes it."""
    prev = ModelPointer(model_uri=f"s3://{BUCKET}/{previous[0]}", sha256=previous[1], model_version=previous[2],
                        promoted_at="2026-11-25T10:00:00Z", reason="test")
    new = ModelPointer(model_uri=f"s3://{BUCKET}/{key}", sha256=sha256, model_version=version,
                       promoted_at="2026-11-26T10:00:00Z", reason="test")
    aws["ssm"].put_parameter(Name=PARAM, Value=prev.succeeded_by(new).to_json(), Type="String", Overwrite=True)


def fallback_points(text: str) -> int:
    """How many ``ModelFallback`` EMF data points the function printed."""
    points = 0
    for line in text.splitlines():
        if line.startswith("{") and '"ModelFallback"' in line:
            doc = json.loads(line)
            assert doc["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"] == "ModelFallback"
            points += int(doc["ModelFallback"] if not isinstance(doc["ModelFallback"], list) else
                          sum(doc["ModelFallback"]))
    return points


@pytest.mark.parametrize("damage", ["missing", "corrupt", "checksum"])
def test_a_cold_start_after_a_bad_promotion_serves_the_previous_model(
        monkeypatch, inference_app, aws, tiny_bundle_archive, second_archive, tmp_path, jpeg, capsys, damage):
    v1 = ("models/v1/model.tar.gz", file_sha256(tiny_bundle_archive), "test-tiny-0001")
    good_sha = file_sha256(second_archive)
    if damage == "missing":
        aws["s3"].delete_object(Bucket=BUCKET, Key="models/v2/model.tar.gz")
        sha = good_sha
    elif damage == "corrupt":  # present, its checksum matches the pointer, but it is no bundle
        junk = tmp_path / "junk.tar.gz"
        junk.write_bytes(b"\x1f\x8b not really gzip" * 100)
        aws["s3"].upload_file(str(junk), BUCKET, "models/v2/model.tar.gz")
        sha = file_sha256(junk)
    else:
        sha = "e" * 64
    promote_over(aws, "models/v2/model.tar.gz", sha, "test-tiny-0002", previous=v1)
    now = [1000.0]
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", pointer_ttl_seconds=0,
                      fallback_retry_seconds=60)
    monkeypatch.setattr(store, "_clock", lambda: now[0])
    capsys.readouterr()
    assert version_served(inference_app, jpeg) == "test-tiny-0001"  # a new environment, not a 503
    health = call(inference_app, api_event("GET", "/health"))
    doc = health.json()
    assert health.status == 200 and doc["status"] == "fallback" and doc["model"]["fallback"] is True
    assert doc["model"]["version"] == "test-tiny-0001"
    assert doc["fallback"]["promoted_version"] == "test-tiny-0002" and doc["fallback"]["next_retry_seconds"] == 60
    assert BUCKET not in health.text and "models/v2" not in health.text
    assert fallback_points(capsys.readouterr().out) == 1
    # Within the retry interval the promoted archive is not fetched again.
    counting = CountingS3()
    monkeypatch.setattr(store, "_s3", counting)
    now[0] += 30
    assert version_served(inference_app, jpeg) == "test-tiny-0001" and counting.downloads == []
    # Still broken when retried: one more attempt, one more data point, still serving.
    now[0] += 31
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert counting.downloads == ["models/v2/model.tar.gz"]
    assert fallback_points(capsys.readouterr().out) == 1
    # Repaired (the archive the pointer names is uploaded again): the next retry serves it.
    aws["s3"].upload_file(str(second_archive), BUCKET, "models/v2/model.tar.gz")
    promote_over(aws, "models/v2/model.tar.gz", good_sha, "test-tiny-0002", previous=v1)
    now[0] += 61
    assert version_served(inference_app, jpeg) == "test-tiny-0002"
    doc = call(inference_app, api_event("GET", "/health")).json()
    assert doc["status"] == "ok" and doc["model"]["fallback"] is False and "fallback" not in doc


def test_no_model_at_all_is_503(monkeypatch, inference_app, aws, second_archive, tmp_path, jpeg):
    promote_over(aws, "models/v2/model.tar.gz", "e" * 64, "test-tiny-0002",
                 previous=("models/v1/model.tar.gz", "d" * 64, "test-tiny-0001"))
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache")
    reply = call(inference_app, api_event(body=jpeg, content_type="image/jpeg"))
    assert reply.status == 503 and reply.error_code == "model_unavailable"
    assert "nor the previous one" in store.last_error


def test_a_bad_promotion_while_serving_is_reported_as_a_fallback(
        monkeypatch, inference_app, aws, tiny_bundle_archive, tmp_path, jpeg, capsys):
    v1 = ("models/v1/model.tar.gz", file_sha256(tiny_bundle_archive), "test-tiny-0001")
    promote(aws, *v1)
    store = configure(monkeypatch, inference_app, f"ssm:{PARAM}", tmp_path / "cache", pointer_ttl_seconds=0)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    capsys.readouterr()
    promote_over(aws, "models/v2/model.tar.gz", "e" * 64, "test-tiny-0002", previous=v1)
    assert version_served(inference_app, jpeg) == "test-tiny-0001"
    assert store.fallback()["promoted_version"] == "test-tiny-0002"
    assert fallback_points(capsys.readouterr().out) == 1
