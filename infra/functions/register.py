"""Register every trained model in the SageMaker model registry, Approved or Rejected.

The package carries the figures the gate judged (the evaluation set's, or the validation split's
when there was none, and says which) twice: as ``ModelMetrics`` (the model-quality JSON the gate
wrote, which the SageMaker console renders) and as ``CustomerMetadataProperties`` (searchable
strings: each metric, what it was measured on, the paired comparison with the model in service,
the dataset, its fingerprint, the gate's reasons). Its ``InferenceSpecification`` names the
serving image and the ``model.tar.gz``, so the console shows what would run. The description
says why it was approved or rejected. A rejected model's ``model.tar.gz`` is tagged so that the
artifacts bucket's lifecycle rule expires it.
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
    props["judged_on"] = gate.get("judged_on", "")
    comparison = gate.get("comparison")
    if gate.get("in_service"):
        props["compared_with"] = gate["in_service"]["model_version"]
    if comparison and comparison.get("ci") and None not in comparison["ci"]:
        props["comparison"] = (f"{comparison['metric']} difference {comparison['difference']:+.4f} 95pct CI "
                               f"{comparison['ci'][0]:+.4f} to {comparison['ci'][1]:+.4f} "
                               f"p={comparison['p_value'] if comparison['p_value'] is not None else float('nan'):.4g} "
                               f"McNemar p={comparison['mcnemar']['p_value']:.4g}")
    evaluation = state.get("evaluation") or {}
    if evaluation.get("predictions_uri"):
        props["predictions_uri"] = evaluation["predictions_uri"]
    return {_clip(k, 128): _clip(v) for k, v in props.items() if v not in (None, "")}


def inference_specification(model_uri: str, image_uri: str) -> dict[str, Any]:
    """The serving image and the model archive, with the content types ``POST /predict`` takes
    (contract 5); empty when no image is configured (the local twin builds none)."""
    if not image_uri:
        return {}
    return {"InferenceSpecification": {
        "Containers": [{"Image": image_uri, "ModelDataUrl": model_uri,
                        "Environment": {"MODEL_URI": model_uri}}],
        "SupportedContentTypes": ["image/jpeg", "image/png", "application/dicom", "application/json"],
        "SupportedResponseMIMETypes": ["application/json"],
    }}


def run(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    gate = state["gate"]
    status = "Approved" if gate["approved"] else "Rejected"
    description = (f"{gate['model_version']} trained on {state['run']['dataset']} by {state['training'].get('job_name')}, "
                   f"judged on {gate.get('judged_on', 'its validation split')}: "
                   + ("passed the quality gate" if gate["approved"] else "rejected: " + "; ".join(gate["reasons"])))
    resp = ctx.clients.sagemaker.create_model_package(
        ModelPackageGroupName=ctx.settings.model_package_group,
        ModelPackageDescription=description[:_MAX_DESCRIPTION],
        # A retried step gets the package the first attempt made instead of a second version.
        ClientToken=hashlib.sha256(state["training"].get("job_name", state["run"]["job_name"]).encode()).hexdigest()[:32],
        ModelApprovalStatus=status,
        ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": gate["metrics_uri"]}}},
        CustomerMetadataProperties=metadata(state),
        **inference_specification(gate["model_uri"], ctx.settings.serving_image_uri),
    )
    arn = resp["ModelPackageArn"]
    if not gate["approved"]:
        bucket, key = parse_s3_uri(gate["model_uri"])
        ctx.clients.s3.put_object_tagging(Bucket=bucket, Key=key,
                                          Tagging={"TagSet": [{"Key": APPROVAL_TAG, "Value": "Rejected"}]})
    LOG.info("registered %s as %s (%s)", gate["model_version"], arn, status)
    return {"model_package_arn": arn, "approval_status": status}


handler = lambda_handler(run)
