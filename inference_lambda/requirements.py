"""Write ``requirements.txt`` for the image from ``pyproject.toml``: base dependencies + the serve extra.

``pyproject.toml`` is where versions are pinned; the Dockerfile installs this file so that the
image build needs neither the project's build backend nor its other extras. Regenerate with::

    python -m inference_lambda.requirements
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra.packaging import project_requirements

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
EXTRA = "serve"

HEADER = f"""\
# Generated from pyproject.toml ([project] dependencies + the "{EXTRA}" extra) by
#   python -m inference_lambda.requirements
# Do not edit by hand: a test checks that it matches pyproject.toml.
"""


def serve_requirements() -> list[str]:
    """The pins the image installs: pyproject.toml's base dependencies, then the serve extra's."""
    return project_requirements(EXTRA, root=ROOT)


def render() -> str:
    return HEADER + "".join(f"{r}\n" for r in serve_requirements())


def main() -> int:
    REQUIREMENTS.write_text(render())
    print(f"wrote {REQUIREMENTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
