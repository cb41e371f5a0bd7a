"""Hostile model archives: ``shared.bundle.unpack`` writes only the bundle's own regular files.

Every archive here is crafted by the test. The symlink chain is the CVE-2025-4517 shape (a chain
whose resolved path outgrows PATH_MAX, so ``tarfile``'s ``data`` filter stops resolving it on
Python before 3.11.13 / 3.12.11) and overwrites a file beside the cache folder when the filter is
all that stands in its way.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shared.bundle import (
    BUNDLE_JSON,
    MAX_ARCHIVE_MEMBERS,
    MEMBER_MAX_BYTES,
    MODEL_FILE,
    BundleError,
    read_bundle,
    unpack,
)


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"",
         size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data) if info.size and size is None else None)


def _bundle_members(tar: tarfile.TarFile, bundle: Path) -> None:
    for path in sorted(bundle.rglob("*")):
        if path.is_file():
            _add(tar, path.relative_to(bundle).as_posix(), data=path.read_bytes())


def _archive(path: Path, bundle: Path | None, extra) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if bundle is not None:
            _bundle_members(tar, bundle)
        extra(tar)
    return path


@pytest.fixture
def cache(tmp_path) -> tuple[Path, Path]:
    """A cache folder with a file beside the unpack destination, as in the serving function's /tmp."""
    folder = tmp_path / "cache"
    folder.mkdir()
    victim = folder / "victim.txt"
    victim.write_text("original")
    return folder / "bundle", victim


def test_symlink_chain_past_path_max_cannot_write_beside_the_destination(tmp_path, cache, tiny_bundle):
    dest, victim = cache
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(tmp_path, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))

    def chain(tar):
        path = ""
        for step in steps:
            _add(tar, os.path.join(path, component), tarfile.DIRTYPE)
            _add(tar, os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        linkpath = os.path.join(*steps, "l" * 254)
        _add(tar, linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        _add(tar, "escape", tarfile.SYMTYPE, os.path.join(linkpath, ".."))
        _add(tar, "escape/victim.txt", data=b"overwritten")

    evil = _archive(tmp_path / "model.tar.gz", None, chain)
    assert evil.stat().st_size < 2048  # the 1.4 KB archive of the finding
    with pytest.raises(BundleError, match="is a link"):
        read_bundle(evil, unpack_to=dest)
    assert victim.read_text() == "original"
    assert not dest.exists() or not any(dest.iterdir())  # refused before anything was written


@pytest.mark.parametrize(("name", "extra", "reason"), [
    ("hardlink inside", lambda t: _add(t, "report/copy.json", tarfile.LNKTYPE, BUNDLE_JSON), "is a link"),
    ("hardlink outside", lambda t: _add(t, "report/x.json", tarfile.LNKTYPE, "../victim.txt"), "is a link"),
    ("symlink", lambda t: _add(t, "report/roc.png", tarfile.SYMTYPE, "../../victim.txt"), "is a link"),
    ("dot-dot name", lambda t: _add(t, "../victim.txt", data=b"overwritten"), "not a plain path"),
    ("dot-dot inside", lambda t: _add(t, "report/../../victim.txt", data=b"x"), "not a plain path"),
    ("absolute name", lambda t: _add(t, "/tmp/cxr-absolute.txt", data=b"x"), "not a plain path"),
    ("character device", lambda t: _add(t, "report/null", tarfile.CHRTYPE), "not a regular file"),
    ("fifo", lambda t: _add(t, "report/pipe", tarfile.FIFOTYPE), "not a regular file"),
    ("unexpected member", lambda t: _add(t, "sitecustomize.py", data=b"import os"), "not part of a model bundle"),
    ("nested report file", lambda t: _add(t, "report/a/b.txt", data=b"x"), "not part of a model bundle"),
    ("hidden report file", lambda t: _add(t, "report/.bashrc", data=b"x"), "not part of a model bundle"),
    ("name given twice", lambda t: _add(t, BUNDLE_JSON, data=b"{}"), "more than once"),
])
def test_hostile_member_is_refused_and_nothing_is_written(tmp_path, cache, tiny_bundle, name, extra, reason):
    dest, victim = cache
    evil = _archive(tmp_path / "model.tar.gz", tiny_bundle, extra)
    with pytest.raises(BundleError, match=reason) as err:
        unpack(evil, dest)
    assert "model.tar.gz" in str(err.value) and "\n" not in str(err.value)
    assert victim.read_text() == "original"
    assert not dest.exists()  # every check runs before the first file is written
    assert not Path("/tmp/cxr-absolute.txt").exists()


def test_oversize_member_is_refused(tmp_path, cache, tiny_bundle):
    dest, _ = cache
    big = b" " * (MEMBER_MAX_BYTES[BUNDLE_JSON] + 1)  # a valid-looking JSON file padded past its cap
    evil = _archive(tmp_path / "model.tar.gz", None, lambda t: (
        _add(t, BUNDLE_JSON, data=b"{}" + big), _add(t, MODEL_FILE, data=(tiny_bundle / MODEL_FILE).read_bytes())))
    with pytest.raises(BundleError, match=rf"'{BUNDLE_JSON}' is {len(big) + 2:,} bytes, over its limit"):
        unpack(evil, dest)
    assert not dest.exists()


def test_archive_bomb_is_refused_from_its_headers(tmp_path, cache):
    """A header announcing 600 MB is refused before a byte of it is inflated."""
    dest, _ = cache

    def bomb(tar):
        _add(tar, BUNDLE_JSON, data=b"{}")
        info = tarfile.TarInfo(MODEL_FILE)
        info.size = 600 * 1024 * 1024
        tar.fileobj.write(info.tobuf())  # header only: the data is never there

    with pytest.raises(BundleError, match="unpacks to more than 512 MB"):
        unpack(_archive(tmp_path / "model.tar.gz", None, bomb), dest)
    many = _archive(tmp_path / "many.tar.gz", None,
                    lambda t: [_add(t, f"report/{i}.txt", data=b"x") for i in range(MAX_ARCHIVE_MEMBERS + 1)])
    with pytest.raises(BundleError, match=f"more than {MAX_ARCHIVE_MEMBERS} entries"):
        unpack(many, dest)


def test_bundle_with_dot_slash_names_unpacks_as_plain_files(tmp_path, tiny_bundle):
    """What ``tar czf model.tar.gz -C model .`` (and SageMaker) writes still loads; modes are not taken over."""
    def dotted(tar):
        _add(tar, "./", tarfile.DIRTYPE)
        _add(tar, "./report/", tarfile.DIRTYPE)
        for path in sorted(tiny_bundle.rglob("*")):
            if path.is_file():
                info = tarfile.TarInfo("./" + path.relative_to(tiny_bundle).as_posix())
                info.size, info.mode = path.stat().st_size, 0o4777  # setuid, world-writable: not kept
                tar.addfile(info, io.BytesIO(path.read_bytes()))

    bundle = read_bundle(_archive(tmp_path / "model.tar.gz", None, dotted), unpack_to=tmp_path / "out")
    assert bundle.version == "test-tiny-0001"
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {BUNDLE_JSON, MODEL_FILE}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
