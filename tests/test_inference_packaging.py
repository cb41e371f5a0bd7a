"""The inference image: pinned requirements, Dockerfile, build context, and no torch at serving time."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from inference_lambda.requirements import REQUIREMENTS, render, serve_requirements

DOCKERFILE = ROOT / "inference_lambda" / "Dockerfile"
# glibc of each Lambda Python base image: python:3.11 is Amazon Linux 2, 3.12 and later AL2023.
LAMBDA_IMAGE_GLIBC = {"3.11": 26, "3.12": 34, "3.13": 34}


def test_requirements_txt_is_what_pyproject_says():
    assert REQUIREMENTS.read_text() == render(), "run: python -m inference_lambda.requirements"
    reqs = serve_requirements()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+\-]*", r) for r in reqs), reqs
    names = {r.split("==")[0].lower() for r in reqs}
    assert {"numpy", "pillow", "pydicom", "onnxruntime", "aws-lambda-powertools", "boto3", "multipart"} <= names
    assert not names & {"torch", "torchvision", "matplotlib", "onnx", "scikit-learn"}


def base_image() -> tuple[str, str]:
    m = re.search(r"^FROM\s+(public\.ecr\.aws/lambda/python):(\d+\.\d+)@sha256:[0-9a-f]{64}\s*$",
                  DOCKERFILE.read_text(), re.MULTILINE)
    assert m, "the Dockerfile must build on the AWS Lambda Python base image, pinned by digest"
    return m.group(1), m.group(2)


def test_dockerfile_installs_only_the_serve_requirements_and_the_serving_code():
    text = DOCKERFILE.read_text()
    base_image()
    assert 'CMD ["inference_lambda.app.handler"]' in text
    copies = re.findall(r"^COPY\s+(\S+)\s+(\S+)", text, re.MULTILINE)
    assert [src for src, _ in copies] == ["inference_lambda/requirements.txt", "shared/", "inference_lambda/"]
    installs = re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", text)
    assert len(installs) == 1 and "-r /tmp/requirements.txt" in installs[0] and "--only-binary=:all:" in installs[0]
    assert "torch" not in text.replace("no torch", "")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pat) or (pat.startswith("**/") and
                                                  fnmatch.fnmatchcase(cand.split("/")[-1], pat[3:])):
                excluded = not negate
                break
    return excluded


def test_dockerignore_lets_in_only_what_the_image_needs():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for needed in ("inference_lambda/requirements.txt", "inference_lambda/app.py", "inference_lambda/static/index.html",
                   "shared/imaging.py", "shared/predictor.py"):
        assert not dockerignored(needed, patterns), needed
    for unwanted in (".git/HEAD", ".venv/bin/python", "node_modules/x/index.js", "cdk.out/manifest.json",
                     "tests/conftest.py", "training_job/train.py", "infra/app.py", "runs/a/model.onnx", "data/x.jpeg",
                     "README.md", "shared/__pycache__/imaging.cpython-312.pyc", ".twin/state"):
        assert dockerignored(unwanted, patterns), unwanted


def test_dockerfile_requirements_resolve_for_the_lambda_image(tmp_path):
    """pip resolves the pins to wheels that install on the base image's Python and glibc (dry run)."""
    _, python = base_image()
    glibc = LAMBDA_IMAGE_GLIBC[python]
    report = tmp_path / "report.json"
    out = pip_dry_run(python, glibc, report, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    for req in serve_requirements():
        name, version = req.split("==")
        assert resolved.get(name.lower()) == version, (req, resolved)
    assert not [n for n in resolved if n.startswith(("torch", "nvidia", "triton"))], resolved
    for item in json.loads(report.read_text())["install"]:
        wheel = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert wheel.endswith(".whl"), wheel


def test_python311_lambda_image_could_not_install_the_pins(tmp_path):
    """Why the Dockerfile is not on python:3.11: Amazon Linux 2's glibc 2.26 has no wheels for the pins."""
    out = pip_dry_run("3.11", LAMBDA_IMAGE_GLIBC["3.11"], tmp_path / "r.json", tmp_path)
    assert out.returncode != 0
    assert "No matching distribution" in out.stderr or "Could not find a version" in out.stderr


def pip_dry_run(python: str, glibc_minor: int, report: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    platforms = ["manylinux2014_x86_64"] + [f"manylinux_2_{m}_x86_64" for m in range(17, glibc_minor + 1)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
           *[a for p in platforms for a in ("--platform", p)],
           "--target", str(tmp_path / "target"), "--report", str(report), "-r", str(REQUIREMENTS)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# -- no torch ---------------------------------------------------------------------------------------


def test_serving_code_never_imports_torch():
    for path in (ROOT / "inference_lambda").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not re.match(r"\s*(import|from)\s+(torch|torchvision|matplotlib)\b", line), f"{path}: {line}"


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_a_prediction_with_heatmap_loads_no_torch(tiny_bundle, originals, tmp_path):
    code = f"""
import base64, json, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_inference_support import api_event
from inference_lambda import app
event = api_event(body=open({str(originals[0])!r}, 'rb').read(), content_type='image/jpeg', query={{'explain': '1'}})
reply = app.handler(event, None)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'matplotlib', 'training_job'))
print(json.dumps({{'status': reply['statusCode'], 'heavy': heavy,
                  'heatmap': 'heatmap_png_base64' in json.loads(reply['body'])}}))
"""
    env = {"MODEL_URI": str(tiny_bundle), "MODEL_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "AWS_DEFAULT_REGION": "us-east-1", "POWERTOOLS_METRICS_NAMESPACE": "CxrTests"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "heavy": [], "heatmap": True}
