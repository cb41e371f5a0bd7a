"""One construct per concern; :mod:`infra.stack` only composes them."""

from __future__ import annotations

from aws_cdk import CfnOutput
from constructs import Construct


def output(scope: Construct, key: str, value: str, description: str | None = None) -> CfnOutput:
    """A stack output under a fixed name, so docs and ``launch`` can find it by that name."""
    out = CfnOutput(scope, key, value=value, description=description)
    out.override_logical_id(key)
    return out
