"""Write ``requirements.txt`` for the image from ``pyproject.toml``: base dependencies + the serve extra.

``pyproject.toml`` is where versions are pinned; the Dockerfile installs this file so that the
image build needs neither the project's build backend nor its other extras. Regenerate with::

    python -m inference_lambda.requirements
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
EXTRA = "serve"

HEADER = f"""\
# Generated from pyproject.toml ([project] dependencies + the "{EXTRA}" extra) by
#   python -m inference_lambda.requirements
# Do not edit by hand: a test checks that it matches pyproject.toml.
"""


def serve_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs: list[str] = []
    for req in [*project.get("dependencies", []), *project["optional-dependencies"][EXTRA]]:
        if req not in reqs:
            reqs.append(req)
    return reqs


def render(pyproject: Path = PYPROJECT) -> str:
    return HEADER + "".join(f"{r}\n" for r in serve_requirements(pyproject))


def main() -> int:
    REQUIREMENTS.write_text(render())
    print(f"wrote {REQUIREMENTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
