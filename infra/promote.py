"""List the approved models and move serving to one of them: promotion by hand and rollback.

    python -m infra.promote list                       # approved model packages, newest first
    python -m infra.promote previous                   # roll back to the model served before
    python -m infra.promote to 20261126-101500-ab12cd  # a version (or a model package ARN)

Before anything moves, the chosen archive is downloaded, its SHA-256 checked against the one the
registry (or the pointer) recorded, and the bundle loaded and run once with the serving code
(:mod:`shared.bundle`, :class:`shared.predictor.OnnxPredictor`); only then is the pointer
rewritten, naming the model it replaces as its ``previous`` (so a second ``previous`` undoes the
first). Serving picks the change up within ``MODEL_POINTER_TTL_SECONDS``, without a redeploy.

Against the stack in your account it uses your AWS credentials and the names derived from
``--stack-name`` (cdk.json's ``stackName``). Against the local twin pass ``--twin``: its endpoints
and credentials come from its state folder (``--state-dir``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.bundle import BundleError
from shared.pointer import ModelPointer

from .aws_errors import report_aws_failure
from .functions.common import download, promoted_pointer
from .twin.endpoints import TwinEndpointError


class PromotionError(RuntimeError):
    """Nothing was moved; the message says why."""


@dataclass(frozen=True)
class ApprovedModel:
    model_version: str
    model_uri: str
    sha256: str
    package_arn: str
    created: str
    description: str = ""


def approved_models(sagemaker: Any, group: str) -> list[ApprovedModel]:
    """Every Approved package of the group that records its archive and checksum, newest first."""
    out = []
    pages = sagemaker.get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=group, ModelApprovalStatus="Approved", SortBy="CreationTime", SortOrder="Descending")
    for page in pages:
        for summary in page.get("ModelPackageSummaryList", []):
            d = sagemaker.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
            meta = d.get("CustomerMetadataProperties") or {}
            if not meta.get("model_uri") or not meta.get("model_sha256"):
                continue
            created = d.get("CreationTime")
            out.append(ApprovedModel(meta.get("model_version", ""), meta["model_uri"], meta["model_sha256"],
                                     d["ModelPackageArn"], created.isoformat() if hasattr(created, "isoformat") else str(created),
                                     d.get("ModelPackageDescription", "")))
    return out


def verify(s3: Any, model_uri: str, sha256: str, workdir: Path) -> str:
    """Download, check the SHA-256, load and run the bundle once as serving would; its version.

    Raises :class:`PromotionError` naming what failed."""
    import numpy as np

    from shared.bundle import read_bundle
    from shared.predictor import OnnxPredictor

    try:
        got = download(s3, model_uri, workdir / "model.tar.gz")
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is a refusal, with its reason
        raise PromotionError(f"cannot download {model_uri}: {exc}") from None
    if got != sha256:
        raise PromotionError(f"{model_uri} has SHA-256 {got}, not the {sha256} recorded for it")
    try:
        bundle = read_bundle(workdir / "model.tar.gz", unpack_to=workdir / "bundle")
        predictor = OnnxPredictor(bundle, threads=1)
        size = bundle.preprocessing.size
        predictor.positive_probabilities(np.zeros((1, size, size), dtype=np.uint8))
    except (BundleError, Exception) as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise PromotionError(f"{model_uri} does not load with the serving code: {exc}") from None
    return bundle.version


def move_pointer(s3: Any, ssm: Any, parameter: str, target: ModelPointer, reason: str,
                 now: dt.datetime | None = None) -> ModelPointer:
    """Verify ``target`` and point serving at it; the replaced model becomes its ``previous``."""
    current = promoted_pointer(ssm, parameter)
    if current is not None and current.sha256 == target.sha256:
        raise PromotionError(f"{target.model_version} is already in service")
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        version = verify(s3, target.model_uri, target.sha256, Path(tmp))
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    new = ModelPointer(target.model_uri, target.sha256, version, stamp, reason)
    if current is not None:
        new = current.succeeded_by(new)
    ModelPointer.from_json(new.to_json())  # never write a pointer serving would refuse
    ssm.put_parameter(Name=parameter, Value=new.to_json(), Type="String", Overwrite=True)
    return new


def resolve(choice: str, ssm: Any, sagemaker: Any, parameter: str, group: str) -> tuple[ModelPointer, str]:
    """``previous``, a model version or a package ARN -> (the pointer to write, the reason)."""
    if choice == "previous":
        current = promoted_pointer(ssm, parameter)
        if current is None or current.previous is None:
            raise PromotionError("the pointer names no previous model to roll back to")
        return current.previous, f"rolled back from {current.model_version} to the previous model"
    for m in approved_models(sagemaker, group):
        if choice in (m.model_version, m.package_arn):
            return (ModelPointer(m.model_uri, m.sha256, m.model_version, "1970-01-01T00:00:00Z"),
                    f"promoted by hand from {m.package_arn}")
    raise PromotionError(f"no approved model package with version or ARN {choice!r} in {group} "
                         "(python -m infra.promote list shows them)")


def clients(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .twin.endpoints import twin_clients, twin_state_for

    twin = twin_state_for(args)
    if twin is not None:
        return tuple(twin_clients(twin, "s3", "ssm", "sagemaker"))
    import boto3

    session = boto3.session.Session(region_name=args.region)
    return session.client("s3"), session.client("ssm"), session.client("sagemaker")


def build_parser() -> argparse.ArgumentParser:
    from .config import load

    p = argparse.ArgumentParser(prog="python -m infra.promote", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m infra.promote list\n  python -m infra.promote previous\n"
                                       "  python -m infra.promote to 20261126-101500-ab12cd")
    p.add_argument("--stack-name", default=load().stack_name, help="the deployed stack (default: cdk.json stackName)")
    p.add_argument("--region", help="AWS region (default: your AWS configuration)")
    from .twin.endpoints import add_twin_arguments

    add_twin_arguments(p)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="approved model packages, newest first, and which one serves")
    sub.add_parser("previous", help="roll back to the model the pointer names as previous")
    to = sub.add_parser("to", help="serve an approved model: its version or model package ARN")
    to.add_argument("model", help="model version or model package ARN (see: list)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .names import model_package_group_name, pointer_parameter_name

    args = build_parser().parse_args(argv)
    parameter, group = pointer_parameter_name(args.stack_name), model_package_group_name(args.stack_name)
    try:
        s3, ssm, sagemaker = clients(args)
        current = promoted_pointer(ssm, parameter)
        if args.command == "list":
            models = approved_models(sagemaker, group)
            print(f"in service: {current.model_version if current else 'nothing promoted'}"
                  + (f"; previous: {current.previous.model_version}" if current and current.previous else ""))
            for m in models:
                mark = "*" if current and m.sha256 == current.sha256 else " "
                print(f"{mark} {m.model_version:<34} {m.created[:19]}  {m.package_arn}")
            if not models:
                print(f"no approved model packages in {group}")
            return 0
        target, reason = resolve(args.command if args.command == "previous" else args.model, ssm, sagemaker,
                                 parameter, group)
        new = move_pointer(s3, ssm, parameter, target, reason)
    except (PromotionError, TwinEndpointError) as exc:
        print(f"nothing moved: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - an AWS failure is told in one line; anything else is a bug
        return report_aws_failure(exc, "nothing moved")
    print(f"in service: {new.model_version} (was {new.previous.model_version if new.previous else 'nothing'}); "
          "serving switches within the pointer's refresh interval, no redeploy needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
