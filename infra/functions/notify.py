"""Tell the team how a run ended: promoted, rejected (with the gate's reasons) or failed.

One function serves the three endings; it reads the outcome from the state document. A failed
or rejected run never touched the pointer, and the message says which model is still serving.
"""

from __future__ import annotations

from typing import Any

from .common import StepContext, failure_reason, lambda_handler
from .gate import promoted_pointer

_SUBJECT_LIMIT = 100  # SNS e-mail subjects


def outcome(state: dict[str, Any]) -> str:
    if state.get("error"):
        return "failed"
    if state.get("promotion"):
        return "promoted"
    return "rejected"


def failed_during(state: dict[str, Any]) -> str:
    """The step a failed run was in: the first result missing in the step list's order."""
    from ..pipeline import PIPELINE  # the step list imports this module

    for key, label in PIPELINE.result_order():
        if key not in state:
            return label
    return "notifying"


SKIPPED_SHOWN = 20


def skipped_lines(gate: dict[str, Any]) -> list[str]:
    """The files training skipped as unreadable, with the reason, as the gate step recorded them."""
    count = int(gate.get("skipped_count") or 0)
    if not count:
        return []
    shown = gate.get("skipped") or []
    lines = [f"Training skipped {count} unreadable file{'s' if count != 1 else ''}:"]
    lines += [f"  {s['file']}: {s['reason']}" for s in shown[:SKIPPED_SHOWN]]
    if count > min(len(shown), SKIPPED_SHOWN):
        lines.append(f"  ... and {count - min(len(shown), SKIPPED_SHOWN)} more (the training log lists them all)")
    return lines


def compose(state: dict[str, Any], serving: str | None) -> tuple[str, str]:
    run = state.get("run", {})
    dataset, run_id = run.get("dataset", "?"), run.get("run_id", "?")
    gate = state.get("gate") or {}
    kind = outcome(state)
    serving_line = f"Model in service: {serving}." if serving else "No model has been promoted yet."
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted((gate.get("metrics") or {}).items()))
    judged = f"Judged on {gate.get('judged_on')}" if gate.get("judged_on") else ""
    figures = "Evaluation metrics" if gate.get("evaluated") else "Validation metrics"
    comparison = comparison_line(gate.get("comparison"), (gate.get("in_service") or {}).get("model_version"))
    if kind == "promoted":
        pointer = state["promotion"]["pointer"]
        subject = f"[cxr] {dataset}: model {pointer['model_version']} promoted"
        lines = [f"Run {run_id} trained a model on dataset {dataset} that passed the quality gate and now serves predictions.",
                 f"Model: {pointer['model_version']} ({pointer['model_uri']})",
                 judged, f"{figures}: {metrics}", comparison,
                 f"Previous model: {state['promotion'].get('previous_model_version') or 'none'}"]
    elif kind == "rejected":
        subject = f"[cxr] {dataset}: model {gate.get('model_version', '')} rejected"
        lines = [f"Run {run_id} trained a model on dataset {dataset} that did not pass the quality gate.",
                 "Reasons: " + "; ".join(gate.get("reasons") or ["none given"]),
                 judged, f"{figures}: {metrics}", comparison,
                 "The model in service is unchanged. " + serving_line]
    else:
        reason = failure_reason(state.get("error"))
        step = failed_during(state)
        subject = f"[cxr] {dataset}: run failed during {step}"
        lines = [f"Run {run_id} for dataset {dataset} failed during {step}.",
                 f"Reason: {reason}"]
        if state.get("promotion"):
            lines.append(f"The new model {state['promotion']['pointer']['model_version']} was promoted before the failure.")
        else:
            lines.append("The model in service is unchanged. " + serving_line)
    if state.get("registration", {}).get("model_package_arn"):
        lines.append(f"Model package: {state['registration']['model_package_arn']}")
    lines += skipped_lines(gate)
    lines = [line for line in lines if line]
    # SNS subjects: printable ASCII on one line.
    subject = "".join(c if 32 <= ord(c) < 127 else "?" for c in subject)
    return subject[:_SUBJECT_LIMIT], "\n".join(lines) + "\n"


def comparison_line(comparison: dict[str, Any] | None, versus: str | None) -> str:
    """One sentence on the paired comparison, or "" when there was none."""
    if not comparison:
        return ""
    lo, hi = comparison.get("ci") or (None, None)
    ci = f"95% CI [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else "no interval"
    p = comparison.get("p_value")
    return (f"Against the model in service ({versus}) on the same {comparison['n']} images: {comparison['metric']} "
            f"{comparison['candidate']:.4f} vs {comparison['in_service']:.4f}, difference {comparison['difference']:+.4f} "
            f"({ci}, paired bootstrap p={p if p is not None else float('nan'):.3g}); McNemar on the "
            f"{comparison['mcnemar']['candidate_only_correct'] + comparison['mcnemar']['in_service_only_correct']} "
            f"images labelled differently p={comparison['mcnemar']['p_value']:.3g}")


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    pointer = promoted_pointer(ctx.clients.ssm, ctx.settings.pointer_parameter)
    serving = f"{pointer.model_version} ({pointer.model_uri})" if pointer else None
    subject, message = compose(state, serving)
    resp = ctx.clients.sns.publish(TopicArn=ctx.settings.topic_arn, Subject=subject, Message=message)
    return {"outcome": outcome(state), "subject": subject, "message": message, "message_id": resp.get("MessageId")}


handler = lambda_handler(run)
