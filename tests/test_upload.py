"""The upload command against moto's S3: layout, resumability, marker last and only when changed."""

from __future__ import annotations

import json

import boto3
import pytest
from conftest import DATA_224
from moto import mock_aws

from infra.upload import upload_dataset
from shared.dataset import DatasetLayoutError, check_manifest, scan_relpaths


def small_dataset(root, per_class=5):
    for cls in ("NORMAL", "PNEUMONIA"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for src in sorted((DATA_224 / "train" / cls).iterdir())[:per_class]:
            (d / src.name).symlink_to(src)
    (root / "train" / "COVID").mkdir()
    (root / "train" / "COVID" / "x.jpeg").write_bytes(b"ignored")
    return root


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="data")
        yield client


def test_upload_writes_layout_then_marker_and_resumes(s3, tmp_path):
    data = small_dataset(tmp_path / "ds")
    logs = []
    r = upload_dataset(data, "data", "demo", s3, workers=4, log=logs.append)
    assert (r.uploaded, r.skipped, r.marker_written) == (10, 0, True)
    assert any("COVID" in line for line in logs)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="datasets/demo/")["Contents"]]
    assert "datasets/demo/_READY" in keys and not any("COVID" in k for k in keys)
    head = s3.head_object(Bucket="data", Key="datasets/demo/train/NORMAL/" + sorted((data / "train/NORMAL").iterdir())[0].name)
    assert head["ContentType"] == "image/jpeg"
    manifest = json.loads(s3.get_object(Bucket="data", Key="datasets/demo/_READY")["Body"].read())
    layout = scan_relpaths(k.removeprefix("datasets/demo/") for k in keys)
    assert check_manifest(manifest, layout) == []

    again = upload_dataset(data, "data", "demo", s3, log=logs.append)
    assert (again.uploaded, again.skipped, again.marker_written) == (0, 10, False)

    victim = sorted((data / "train/PNEUMONIA").iterdir())[0]
    s3.put_object(Bucket="data", Key="datasets/demo/train/PNEUMONIA/" + victim.name, Body=b"half an upload")
    resumed = upload_dataset(data, "data", "demo", s3, log=logs.append)
    assert (resumed.uploaded, resumed.skipped, resumed.marker_written) == (1, 9, False)
    assert upload_dataset(data, "data", "demo", s3, retrain=True, log=logs.append).marker_written


def test_bad_layout_uploads_nothing(s3, tmp_path):
    (tmp_path / "ds" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="PNEUMONIA"):
        upload_dataset(tmp_path / "ds", "data", "demo", s3)
    assert "Contents" not in s3.list_objects_v2(Bucket="data")


def test_resume_works_where_etags_are_not_md5(s3, tmp_path, monkeypatch):
    """Under SSE-KMS an ETag is no MD5: the SHA-256 kept in object metadata decides instead."""
    import infra.upload as upload

    data = small_dataset(tmp_path / "ds", per_class=3)
    upload_dataset(data, "data", "kms", s3)
    monkeypatch.setattr(upload, "_md5", lambda path: "not-what-s3-reports")
    again = upload_dataset(data, "data", "kms", s3)
    assert (again.uploaded, again.skipped) == (0, 6)
