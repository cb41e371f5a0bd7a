"""Promote an approved model: point serving at it by rewriting one SSM parameter.

The inference Lambda reads the pointer (:class:`shared.pointer.ModelPointer`) when it starts a
new container, so promotion needs no redeploy; containers already warm keep the model they
loaded until they are recycled. Only this step ever writes the parameter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from shared.pointer import ModelPointer

from .common import LOG, StepContext, StepError, lambda_handler
from .gate import promoted_pointer


def pointer_for(state: dict[str, Any], now: dt.datetime | None = None) -> ModelPointer:
    gate = state["gate"]
    if not gate.get("approved"):
        raise StepError(f"refusing to promote {gate.get('model_version')}: the quality gate rejected it")
    now = now or dt.datetime.now(dt.UTC)
    metric = gate.get("compare_metric") or "roc_auc"
    value = gate.get("metrics", {}).get(metric)
    summary = f"{metric}={value:.4f}" if isinstance(value, (int, float)) else "passed the quality gate"
    package = state.get("registration", {}).get("model_package_arn", "")
    return ModelPointer(
        model_uri=gate["model_uri"], sha256=gate["sha256"], model_version=gate["model_version"],
        promoted_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        reason=f"trained on {state['run']['dataset']}; {summary}" + (f"; {package}" if package else ""),
    )


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    pointer = pointer_for(state)
    ModelPointer.from_json(pointer.to_json())  # never write a pointer serving would refuse
    ssm = ctx.clients.ssm
    previous = promoted_pointer(ssm, ctx.settings.pointer_parameter)
    if previous is not None and previous.sha256 != pointer.sha256:
        pointer = previous.succeeded_by(pointer)  # serving falls back to it if the new archive cannot load
    elif previous is not None:  # the same archive again: keep the fallback it already had
        pointer = dataclasses.replace(pointer, previous=previous.previous)
    ssm.put_parameter(Name=ctx.settings.pointer_parameter, Value=pointer.to_json(), Type="String", Overwrite=True)
    LOG.info("promoted %s (was %s)", pointer.model_version, previous.model_version if previous else "none")
    return {"pointer": pointer.to_dict(), "previous_model_version": previous.model_version if previous else None}


handler = lambda_handler(run)
