"""Build the two code bundles the stack ships, byte for byte reproducible.

- :func:`build_training_source`: the SageMaker submit directory as a ``.tar.gz`` (SageMaker's
  ``sagemaker_submit_directory`` must be a gzipped tar; a CDK directory asset would be a zip).
  It holds ``training_job/``, ``shared/`` and ``requirements.txt`` at the root.
- :func:`stage_functions_context`: the Docker build context of the pipeline functions' image
  (``infra/functions/`` and ``shared/`` and the project's base dependency pins).

Both are content addressed: same sources, same bytes, same CDK asset hash, so an unchanged
checkout never re-uploads or rebuilds anything. Entries are sorted, owners and times zeroed, and
caches left out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import tomllib
from pathlib import Path

from .config import ROOT

STAGING_DIR = ROOT / "build" / "infra"
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
# The PyTorch training container already has these, built for its CUDA.
_CONTAINER_PROVIDED = {"torch", "torchvision"}


def _files(root: Path, package: str) -> list[tuple[str, Path]]:
    base = root / package
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(dirpath, name)
            out.append((path.relative_to(root).as_posix(), path))
    return out


def _requirement_name(spec: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        spec = spec.split(sep, 1)[0]
    return spec.strip().lower()


def training_requirements(root: Path = ROOT) -> str:
    """``requirements.txt`` for the container: training_job's own file, else the pinned pyproject
    dependencies (base + ``train`` extra) without what the container provides."""
    own = root / "training_job" / "requirements.txt"
    if own.is_file():
        return own.read_text()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("train", []))
    keep = [s for s in specs if _requirement_name(s) not in _CONTAINER_PROVIDED]
    return "# The SageMaker PyTorch container provides torch and torchvision.\n" + "\n".join(keep) + "\n"


def training_source_members(root: Path = ROOT) -> list[tuple[str, bytes]]:
    members = [(rel, path.read_bytes()) for pkg in ("training_job", "shared") for rel, path in _files(root, pkg)]
    members.append(("requirements.txt", training_requirements(root).encode()))
    return sorted(members)


def _digest(members: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for rel, data in members:
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def write_tarball(members: list[tuple[str, bytes]], dest: Path) -> Path:
    """A gzipped tar whose bytes depend only on ``members`` (no times, owners or file order)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, data in sorted(members):
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, dest)
    return dest


def build_training_source(out_dir: Path = STAGING_DIR, root: Path = ROOT) -> Path:
    """The submit directory archive, named by its content hash; reused when already built."""
    members = training_source_members(root)
    if not any(rel == "training_job/train.py" for rel, _ in members):
        raise FileNotFoundError(f"{root / 'training_job' / 'train.py'} is missing: nothing to train with")
    dest = Path(out_dir) / f"training-source-{_digest(members)[:20]}.tar.gz"
    if not dest.is_file():
        write_tarball(members, dest)
    return dest


FUNCTIONS_DOCKERFILE = Path(__file__).resolve().parent / "functions" / "Dockerfile"


def functions_context_members(root: Path = ROOT) -> list[tuple[str, bytes]]:
    members = [(rel, path.read_bytes()) for pkg in ("shared", "infra/functions") for rel, path in _files(root, pkg)
               if rel != "infra/functions/Dockerfile"]
    members.append(("infra/__init__.py", (root / "infra" / "__init__.py").read_bytes()))
    members.append(("Dockerfile", FUNCTIONS_DOCKERFILE.read_bytes()))
    members.append(("requirements.txt", base_requirements(root).encode()))
    return sorted(members)


def base_requirements(root: Path = ROOT) -> str:
    """What ``shared/`` and the pipeline functions need: the project's base dependencies and the
    ``evaluate`` extra (ONNX Runtime, SciPy, scikit-learn), pinned in pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("evaluate", []))
    return "\n".join(specs) + "\n"


def stage_functions_context(out_dir: Path = STAGING_DIR, root: Path = ROOT) -> Path:
    """A folder holding exactly the pipeline functions' Docker build context."""
    members = functions_context_members(root)
    dest = Path(out_dir) / f"functions-context-{_digest(members)[:20]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".functions-", dir=dest.parent))
    try:
        for rel, data in members:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            os.replace(tmp, dest)
        except OSError:  # another synth staged the same content first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
