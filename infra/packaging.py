"""Stage the Docker build contexts of the stack's images, and the training image's pins.

- :func:`stage_training_context`: the training image (``training_job/Dockerfile``): ``training_job/``,
  ``shared/`` and ``requirements.txt`` (``training_job/requirements.txt``, generated from
  pyproject.toml by ``python -m infra.packaging``).
- :func:`stage_functions_context`: the pipeline functions' image (``infra/functions/`` and
  ``shared/`` and the project's base dependency pins).

Both are content addressed: same sources, same folder name, same CDK asset hash, so an unchanged
checkout never rebuilds anything. Caches are left out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from .config import ROOT

STAGING_DIR = ROOT / "build" / "infra"
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


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


TRAINING_DOCKERFILE = ROOT / "training_job" / "Dockerfile"
TRAINING_REQUIREMENTS = ROOT / "training_job" / "requirements.txt"
TRAINING_EXTRA = "train"


def project_requirements(*extras: str, root: Path = ROOT) -> list[str]:
    """The pinned ``[project] dependencies`` of pyproject.toml, then those of each extra, without repeats."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs: list[str] = []
    for req in [*project.get("dependencies", []),
                *(r for extra in extras for r in project.get("optional-dependencies", {})[extra])]:
        if req not in reqs:
            reqs.append(req)
    return reqs


def render_training_requirements(root: Path = ROOT) -> str:
    """``training_job/requirements.txt``: everything the training image installs, torch included."""
    return (f"# Generated from pyproject.toml ([project] dependencies + the \"{TRAINING_EXTRA}\" extra) by\n"
            "#   python -m infra.packaging\n"
            "# The training image installs exactly these; CI tests the same pins. Do not edit by hand.\n"
            + "".join(f"{r}\n" for r in project_requirements(TRAINING_EXTRA, root=root)))


def training_context_members(root: Path = ROOT) -> list[tuple[str, bytes]]:
    members = [(rel, path.read_bytes()) for pkg in ("training_job", "shared") for rel, path in _files(root, pkg)
               if rel not in ("training_job/Dockerfile", "training_job/requirements.txt")]
    members.append(("Dockerfile", (root / "training_job" / "Dockerfile").read_bytes()))
    members.append(("requirements.txt", (root / "training_job" / "requirements.txt").read_bytes()))
    return sorted(members)


def _digest(members: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for rel, data in members:
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def stage_training_context(out_dir: Path = STAGING_DIR, root: Path = ROOT) -> Path:
    """A folder holding exactly the training image's Docker build context."""
    members = training_context_members(root)
    if not any(rel == "training_job/train.py" for rel, _ in members):
        raise FileNotFoundError(f"{root / 'training_job' / 'train.py'} is missing: nothing to train with")
    return _stage(members, Path(out_dir) / f"training-context-{_digest(members)[:20]}")


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
    return "\n".join(project_requirements("evaluate", root=root)) + "\n"


def stage_functions_context(out_dir: Path = STAGING_DIR, root: Path = ROOT) -> Path:
    """A folder holding exactly the pipeline functions' Docker build context."""
    members = functions_context_members(root)
    return _stage(members, Path(out_dir) / f"functions-context-{_digest(members)[:20]}")


def _stage(members: list[tuple[str, bytes]], dest: Path) -> Path:
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".context-", dir=dest.parent))
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


def main() -> int:
    TRAINING_REQUIREMENTS.write_text(render_training_requirements())
    print(f"wrote {TRAINING_REQUIREMENTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
