"""The model bundle format: writer, reader, validation, archive handling (shared/bundle.py)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from shared.bundle import (
    BUNDLE_JSON,
    FORMAT_VERSION,
    MODEL_FILE,
    BundleError,
    pack,
    read_bundle,
    unpack,
    validate_meta,
)
from shared.labels import CLASS_NAMES
from shared.preprocessing import PreprocessSpec


def test_written_bundle_reads_back_with_everything_serving_needs(tiny_bundle):
    b = read_bundle(tiny_bundle)
    assert b.meta["format_version"] == FORMAT_VERSION
    assert b.class_names == CLASS_NAMES and b.positive_index == 1
    assert b.preprocessing == PreprocessSpec(size=64, channels=1)
    assert 0 < b.threshold < 1 and b.temperature > 0
    w, bias = b.cam_weights()
    assert w.shape[0] == 2 and bias.shape == (2,)
    probs = b.probabilities(np.array([[0.0, 2.0]]))
    assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-9 and probs[0, 1] > 0.5


def test_archive_round_trip_has_files_at_root(tiny_bundle, tmp_path):
    archive = pack(tiny_bundle, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert BUNDLE_JSON in names and MODEL_FILE in names and not any(n.startswith(("/", "..")) for n in names)
    b = read_bundle(archive, unpack_to=tmp_path / "out")
    assert b.version == "test-tiny-0001"


def test_tampered_model_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(copy)


def test_missing_or_unknown_version_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    meta = json.loads((copy / BUNDLE_JSON).read_text())
    meta["format_version"] = 99
    (copy / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version 99"):
        read_bundle(copy)
    with pytest.raises(BundleError, match="no bundle.json"):
        read_bundle(tmp_path)


def test_validation_lists_every_problem(tiny_bundle):
    meta = json.loads((tiny_bundle / BUNDLE_JSON).read_text())
    meta.update(threshold=1.5, temperature=-1, class_names=["A"], preprocessing={"size": 5})
    del meta["provenance"]["device"]
    with pytest.raises(BundleError) as err:
        validate_meta(meta)
    text = str(err.value)
    for part in ("threshold", "temperature", "class_names", "preprocessing", "provenance.device"):
        assert part in text


def test_unpack_refuses_paths_outside_destination(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError):
        unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_garbage_archive_is_a_bundle_error(tmp_path):
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(BundleError, match=r"^cannot unpack model archive model.tar.gz: not a tar archive") as err:
        read_bundle(bad)
    assert "\n" not in str(err.value)
    # an archive with the bundle one folder down names the archive, not the temporary folder it went to
    nested = tmp_path / "nested.tar.gz"
    with tarfile.open(nested, "w:gz") as tar:
        info = tarfile.TarInfo("model/bundle.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BundleError, match="^model archive nested.tar.gz holds no bundle.json at its top level"):
        read_bundle(nested)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "absent.tar.gz")
