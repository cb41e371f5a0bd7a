"""Dataset layout, patient keys, fingerprint and the _READY manifest (shared/dataset.py)."""

from __future__ import annotations

import csv

import pytest
from conftest import DATA, DATA_224

from shared.dataset import (
    DatasetLayoutError,
    build_manifest,
    check_manifest,
    fingerprint,
    patient_key,
    scan_directory,
    scan_relpaths,
)


def test_patient_keys_follow_the_data_readme():
    assert patient_key("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_key("train/PNEUMONIA/person1000_virus_1681.jpeg") == "person1000"
    assert patient_key("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_key("NORMAL2-IM-0468-0001.jpeg") == "NORMAL2-IM-0468"
    assert patient_key("NORMAL2-IM-0468-0001.jpeg") != patient_key("IM-0468-0001.jpeg")
    assert patient_key("whatever.png") == "whatever"


def test_layout_is_case_insensitive_and_reports_other_classes():
    layout = scan_relpaths([
        "train/normal/a.jpeg", "train/Pneumonia/person1_x.JPG", "train/COVID/c.jpeg", "train/COVID/d.jpeg",
        "val/NORMAL/b.png", "val/PNEUMONIA/e.dcm", "test/NORMAL/t.jpeg", "Test/pneumonia/u.png",
        "extra/NORMAL/x.jpeg", "train/NORMAL/notes.txt", "stray.jpeg", "_READY",
    ])
    assert layout.counts() == {"train": {"NORMAL": 1, "PNEUMONIA": 1}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
                               "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert layout.ignored_classes == {"train/COVID": 2, "extra": 1}
    assert {r for r, _ in layout.ignored_files} == {"train/NORMAL/notes.txt", "stray.jpeg"}
    layout.check()


def test_missing_class_and_wrong_layout_are_named():
    with pytest.raises(DatasetLayoutError, match="PNEUMONIA in split 'train'"):
        scan_relpaths(["train/NORMAL/a.jpeg"]).check()
    with pytest.raises(DatasetLayoutError, match="PNEUMONIA in split 'test'"):
        scan_relpaths(["train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg", "test/NORMAL/c.jpeg"]).check()
    with pytest.raises(DatasetLayoutError, match="no train/NORMAL"):
        scan_relpaths(["images/a.jpeg", "images/b.jpeg"]).check()


def test_fingerprint_of_the_shared_copy_matches_its_manifest():
    layout = scan_directory(DATA_224)
    # test/ is the evaluation set: carried, counted, never a training channel.
    assert layout.counts() == {"train": {"NORMAL": 1341, "PNEUMONIA": 3875}, "test": {"NORMAL": 119, "PNEUMONIA": 192}}
    rows = list(csv.DictReader(open(DATA / "manifest.csv")))  # lists the train split
    from_manifest = fingerprint(r["relative_path"].split("/", 1)[1] for r in rows)
    assert fingerprint(p for p in layout.all_files() if p.startswith("train/")) == from_manifest


def test_manifest_round_trip_and_mismatch():
    layout = scan_relpaths(["train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg"])
    manifest = build_manifest("demo", layout, "2026-01-01T00:00:00Z")
    assert check_manifest(manifest, layout) == []
    grown = scan_relpaths(["train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg", "train/PNEUMONIA/c.jpeg"])
    problems = check_manifest(manifest, grown)
    assert any("counts" in p for p in problems) and any("fingerprint" in p for p in problems)
    assert check_manifest("nope", layout)
