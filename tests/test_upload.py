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


def run_main(capsys, *argv):
    from infra.upload import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def failure_line(err: str) -> str:
    """The one line that says why (after any notes), with no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("upload failed")] == lines[-1:], err
    return lines[-1]


def test_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path, capsys):
    data = small_dataset(tmp_path / "ds", per_class=1)
    code, out, err = run_main(capsys, "--data", str(data), "--bucket", "no-such-bucket", "--name", "demo",
                              "--region", "us-east-1")
    assert code == 1 and out == ""
    assert failure_line(err) == "upload failed: bucket no-such-bucket does not exist: check the bucket name and the region"


def test_missing_credentials_are_one_line(no_aws_credentials, tmp_path, capsys):
    data = small_dataset(tmp_path / "ds", per_class=1)
    code, _, err = run_main(capsys, "--data", str(data), "--bucket", "data", "--name", "demo", "--region", "us-east-1")
    assert code == 1
    assert failure_line(err) == ("upload failed: no AWS credentials found: run `aws configure` or `aws sso login`, "
                                 "or set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")


def test_access_denied_is_one_line(tmp_path, capsys, monkeypatch):
    from botocore.stub import Stubber

    import infra.upload as upload

    client = boto3.client("s3", region_name="us-east-1")
    stub = Stubber(client)
    stub.add_client_error("list_objects_v2", service_error_code="AccessDenied", service_message="Access Denied",
                          http_status_code=403)
    monkeypatch.setattr(upload, "s3_client", lambda endpoint_url=None, region=None: client)
    data = small_dataset(tmp_path / "ds", per_class=1)
    with stub:
        code, _, err = run_main(capsys, "--data", str(data), "--bucket", "theirs", "--name", "demo")
    assert code == 1
    assert failure_line(err) == ("upload failed: access denied: the AWS credentials in use may not call "
                                 "ListObjectsV2 on s3://theirs/")


def test_denied_uploads_keep_the_marker_unwritten(s3, tmp_path, monkeypatch):
    from botocore.exceptions import ClientError

    def denied(*_a, **_kw):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")

    monkeypatch.setattr(s3, "upload_file", denied)
    with pytest.raises(RuntimeError, match=r"^2 uploads failed \(first: datasets/demo/train/\w+/\S+: access denied: "
                                           r"the AWS credentials in use may not call PutObject on s3://data/"):
        upload_dataset(small_dataset(tmp_path / "ds", per_class=1), "data", "demo", s3, log=lambda _: None)
    assert "Contents" not in s3.list_objects_v2(Bucket="data")


def test_a_dataset_too_small_to_validate_on_uploads_with_a_warning(s3, tmp_path, capsys):
    data = small_dataset(tmp_path / "ds", per_class=5)
    code, out, err = run_main(capsys, "--data", str(data), "--bucket", "data", "--name", "demo")
    assert code == 0 and out.startswith("10 uploaded, 0 already there")
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: this dataset is too small to train and validate on: NORMAL 5, PNEUMONIA 5 images: "
                       "1 in 7 is split off by patient to validate, about 0 per class, fewer than 20; give 140 or "
                       "more per class, or a val/ split with 20 or more per class"]
    assert s3.head_object(Bucket="data", Key="datasets/demo/_READY")  # a warning, not a refusal
