"""The CDK app: ``cdk synth`` / ``cdk deploy`` run ``python3 -m infra.app`` (see cdk.json).

cdk-nag's AWS Solutions and HIPAA Security packs check every resource as CDK policy-validation
plugins; a finding not acknowledged with a written reason (:mod:`infra.nag`) fails ``cdk synth``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
# The SageMaker SDK (training image lookup) logs where it looked for its defaults on import.
logging.getLogger("sagemaker.config").setLevel(logging.WARNING)

import aws_cdk as cdk  # noqa: E402
from cdk_nag import AwsSolutionsChecks, HIPAASecurityChecks  # noqa: E402

from .config import ROOT, Config, cdk_json_context  # noqa: E402
from .stack import CxrPneumoniaStack  # noqa: E402


def build_app(context: dict | None = None, outdir: str | None = None,
              source_root: Path = ROOT) -> tuple[cdk.App, CxrPneumoniaStack]:
    """The app and its stack; ``source_root`` is the inference image's build context (the repository)."""
    # cdk.json's context (knobs and feature flags) also applies when the app runs outside the
    # CDK CLI, as in tests; values the CLI passes (-c key=value) still win.
    app = cdk.App(context={**cdk_json_context(), **(context or {})}, outdir=outdir)
    config = Config.from_context(app.node.try_get_context)
    # A concrete region fixes ARNs at synth time; without one the template stays region-agnostic.
    region = config.region or os.environ.get("CDK_DEFAULT_REGION")
    account = os.environ.get("CDK_DEFAULT_ACCOUNT")
    env = cdk.Environment(account=account, region=region) if region else None
    stack = CxrPneumoniaStack(app, config.stack_name, config=config, env=env, source_root=source_root)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True), HIPAASecurityChecks(app, verbose=True))
    return app, stack


def main() -> None:
    app, _ = build_app()
    app.synth()


if __name__ == "__main__":
    main()
