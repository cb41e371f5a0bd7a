"""Register every trained model in the SageMaker model registry, Approved or Rejected.

The package carries the validation metrics twice: as ``ModelMetrics`` (the model-quality JSON
the gate wrote, which the SageMaker console renders) and as ``CustomerMetadataProperties``
(searchable strings: each metric, the dataset, its fingerprint, the gate's reasons). A rejected
model's ``model.tar.gz`` is tagged so that the artifacts bucket's lifecycle rule expires it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .common import APPROVAL_TAG, LOG, StepContext, lambda_handler, parse_s3_uri

_MAX_VALUE = 256  # CustomerMetadataProperties values are at most 256 characters
_MAX_DESCRIPTION = 1000


_NOT_ALLOWED = re.compile(r"[^\w\s.:/=+\-@]")  # the registry's metadata alphabet


def _clip(text: Any, limit: int = _MAX_VALUE) -> str:
    text = " ".join(_NOT_ALLOWED.sub(" ", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def metadata(state: dict[str, Any]) -> dict[str, str]:
    gate, run, dataset, training = state["gate"], state["run"], state.get("dataset", {}), state["training"]
    props = {f"metric:{k}": f"{float(v):.6f}" for k, v in sorted(gate["metrics"].items())}
    props.update({
        "dataset": run["dataset"],
        "dataset_uri": dataset.get("uri", ""),
        "dataset_fingerprint": dataset.get("fingerprint", ""),
        "training_job": training.get("job_name", run["job_name"]),
        "model_uri": gate["model_uri"],
        "model_sha256": gate["sha256"],
        "model_version": gate["model_version"],
        "gate": "approved" if gate["approved"] else "rejected",
    })
    if gate["reasons"]:
        props["gate_reasons"] = "; ".join(gate["reasons"])
    if gate.get("in_service"):
        props["compared_with"] = gate["in_service"]["model_version"]
    return {_clip(k, 128): _clip(v) for k, v in props.items() if v not in (None, "")}


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    gate = state["gate"]
    status = "Approved" if gate["approved"] else "Rejected"
    description = (f"{gate['model_version']} trained on {state['run']['dataset']} by {state['training'].get('job_name')}: "
                   + ("passed the quality gate" if gate["approved"] else "rejected: " + "; ".join(gate["reasons"])))
    resp = ctx.clients.sagemaker.create_model_package(
        ModelPackageGroupName=ctx.settings.model_package_group,
        ModelPackageDescription=description[:_MAX_DESCRIPTION],
        # A retried step gets the package the first attempt made instead of a second version.
        ClientToken=hashlib.sha256(state["training"].get("job_name", state["run"]["job_name"]).encode()).hexdigest()[:32],
        ModelApprovalStatus=status,
        ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": gate["metrics_uri"]}}},
        CustomerMetadataProperties=metadata(state),
    )
    arn = resp["ModelPackageArn"]
    if not gate["approved"]:
        bucket, key = parse_s3_uri(gate["model_uri"])
        ctx.clients.s3.put_object_tagging(Bucket=bucket, Key=key,
                                          Tagging={"TagSet": [{"Key": APPROVAL_TAG, "Value": "Rejected"}]})
    LOG.info("registered %s as %s (%s)", gate["model_version"], arn, status)
    return {"model_package_arn": arn, "approval_status": status}


handler = lambda_handler(run)
