"""Fixtures shared by the whole suite. Nothing here reaches beyond loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATA_224 = DATA / "chest_xray_224"
ORIGINALS = DATA / "chest_xray_original_sample"

# Tests never talk to AWS: fake credentials, a region, no instance metadata, no telemetry.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_SESSION_TOKEN", "testing")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("SAGEMAKER_TELEMETRY_OPT_OUT", "true")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "CxrTests")
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "cxr-inference")


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An environment where botocore finds no credentials: no variables, empty config files, no metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CREDENTIAL_EXPIRATION"):
        monkeypatch.delenv(name, raising=False)
    for name, file in (("AWS_SHARED_CREDENTIALS_FILE", "credentials"), ("AWS_CONFIG_FILE", "config")):
        (tmp_path / file).write_text("")
        monkeypatch.setenv(name, str(tmp_path / file))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    # boto3's default session caches the credentials it resolved for an earlier test's clients.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def original_images() -> list[Path]:
    """The six full-size originals (3 per class)."""
    return sorted(ORIGINALS.glob("train/*/*.jpeg"))


@pytest.fixture(scope="session")
def originals() -> list[Path]:
    paths = original_images()
    assert len(paths) == 6, f"expected the 6 full-size originals under {ORIGINALS}"
    return paths


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained but complete bundle (seed CNN, 64 px) written through the real export path.

    For tests of the bundle format and the serving path, where the weights do not matter.
    """
    import torch

    from shared.preprocessing import PreprocessSpec
    from training_job.export import write_model_bundle
    from training_job.models import build_model

    torch.manual_seed(0)
    spec = PreprocessSpec(size=64, channels=1)
    model = build_model("seed_cnn", in_channels=1, width=8).eval()
    out = tmp_path_factory.mktemp("tiny-bundle")
    write_model_bundle(
        model, spec, out, model_version="test-tiny-0001", threshold=0.5, temperature=1.0,
        architecture="seed_cnn",
        validation_metrics={"accuracy": 0.5, "roc_auc": 0.5, "sensitivity": 0.5, "specificity": 0.5},
        provenance={"dataset": {"fingerprint": "0" * 64, "counts": {}}, "hyperparameters": {},
                    "code_version": "test", "started_at": "2026-01-01T00:00:00Z",
                    "finished_at": "2026-01-01T00:00:01Z", "device": "cpu"},
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle_archive(tiny_bundle, tmp_path_factory) -> Path:
    from shared.bundle import ARCHIVE_NAME, pack

    return pack(tiny_bundle, tmp_path_factory.mktemp("tiny-archive") / ARCHIVE_NAME)


@pytest.fixture
def inference_app(monkeypatch, tiny_bundle, tmp_path):
    """The inference Lambda's handler module serving ``tiny_bundle``, as after a fresh cold start."""
    from inference_lambda import app
    from inference_lambda.config import Settings
    from inference_lambda.model_store import ModelStore

    settings = Settings(model_uri=str(tiny_bundle), cache_dir=tmp_path / "model-cache")
    monkeypatch.setattr(app, "settings", settings)
    monkeypatch.setattr(app, "store", ModelStore(settings))
    return app
