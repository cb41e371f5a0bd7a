"""The real CDK CLI (pinned in package.json, installed by `npm ci`) synthesizes the app offline:
no AWS credentials, no Docker, no network beyond what the CLI is told not to use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CDK = ROOT / "node_modules" / ".bin" / "cdk"


# `make test` installs the CLI; only a hand-run pytest without it may skip, never CI.
_MISSING = "node is not installed" if shutil.which("node") is None else (
    "node_modules is absent: run `npm ci` to install the pinned aws-cdk CLI" if not CDK.exists() else "")


@pytest.mark.slow
@pytest.mark.skipif(bool(_MISSING) and os.environ.get("CI") != "true", reason=_MISSING or "n/a")
def test_cdk_synth_succeeds_offline(tmp_path):
    assert not _MISSING, _MISSING
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION", "AWS_PROFILE", "CDK_"))}
    env.update({
        # cdk.json runs `python3 -m infra.app`: the project's interpreter must come first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "CDK_DISABLE_VERSION_CHECK": "1",
        "CDK_DISABLE_CLI_TELEMETRY": "true",
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
        "SAGEMAKER_TELEMETRY_OPT_OUT": "true",
        "HOME": str(tmp_path),  # no ~/.aws, no CLI caches from elsewhere
    })
    out = tmp_path / "cdk.out"
    proc = subprocess.run([str(CDK), "synth", "--quiet", "--no-notices", "--no-version-reporting", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    template = json.loads((out / "CxrPneumonia.template.json").read_text())
    assert "AwsSolutions-" not in proc.stderr and "HIPAA.Security-" not in proc.stderr
    # The training job runs the training image asset, isolated from the network.
    machines = {k: r for k, r in template["Resources"].items() if r["Type"] == "AWS::StepFunctions::StateMachine"}
    [machine] = [r for k, r in machines.items() if "Training" in k]  # beside it: the batch inference machine
    definition = json.dumps(machine["Properties"]["DefinitionString"])
    assert '\\"EnableNetworkIsolation\\":true' in definition
    assets = json.loads((out / "CxrPneumonia.assets.json").read_text())
    assert any(a["source"].get("dockerFile") == "inference_lambda/Dockerfile" for a in assets["dockerImages"].values())
    training = [h for h, a in assets["dockerImages"].items()
                if (out / a["source"]["directory"] / "training_job" / "container.py").is_file()]
    assert len(training) == 1 and training[0] in definition
