"""Start a SageMaker training job by hand, configured exactly like the pipeline's.

::

    python -m infra.launch --dataset s3://<data bucket>/datasets/<name>/ --role <SageMakerRoleArn> [--wait]

Instance type, managed spot, run/wait limits, network isolation, inter-container encryption,
VPC, volume encryption, hyperparameters (JSON-encoded, as the state machine sends them) and
metric definitions come from :mod:`infra.config` (cdk.json context, the same values the stack
uses; ``-c key=value`` overrides like ``cdk -c``). The image is the deployed stack's training image
(its ``TrainingImage`` output; ``--image-uri`` or ``trainingImageUri`` to choose another), which
holds the code: nothing is uploaded. The model lands under ``models/<job>/`` and checkpoints under
``checkpoints/<job>/`` of the artifacts bucket.
The dataset is checked with :mod:`shared.dataset` first, as the pipeline's validate step does.
The job is not gated, registered or promoted: that is the pipeline's work.

``--role``, ``--artifacts-bucket`` and ``--image-uri`` default to the deployed stack's outputs
(``SageMakerRoleArn``, ``ArtifactsBucketName``, ``DataKeyArn``, ``TrainingImage``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import sys
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from shared.cli import HelpFormatter

from .aws_errors import describe, error_code
from .config import (
    CHECKPOINT_LOCAL_PATH,
    CHECKPOINTS_PREFIX,
    METRIC_DEFINITIONS,
    MODELS_PREFIX,
    Config,
    ConfigError,
    load,
)
from .functions.common import DatasetInvalid, StepError, parse_s3_uri, run_id
from .functions.validate_dataset import channels, list_relpaths

LOG = logging.getLogger("cxr.launch")


class LaunchError(RuntimeError):
    pass


def stack_outputs(cfn: Any, stack_name: str) -> dict[str, str] | None:
    """The deployed stack's outputs (OutputKey -> OutputValue); None when no stack of that name exists.

    Raises :class:`LaunchError` with the real reason when the stack cannot be read: no
    credentials, rejected credentials, access denied, an unreachable endpoint or any other error.
    """
    try:
        stacks = cfn.describe_stacks(StackName=stack_name)["Stacks"]
    except (ClientError, BotoCoreError) as exc:
        if error_code(exc) == "ValidationError" and "does not exist" in str(exc):
            return None
        raise LaunchError(f"cannot read the outputs of the stack {stack_name}: {describe(exc, f'stack {stack_name}')}. "
                          "Pass --role, --artifacts-bucket, --image-uri and --kms-key to launch without "
                          "reading it") from None
    if not stacks:
        return None
    return {o["OutputKey"]: o["OutputValue"] for o in (stacks[0].get("Outputs") or [])}


def dataset_channels(s3: Any, dataset_uri: str) -> tuple[str, list[dict[str, Any]], str]:
    """(dataset name, SageMaker channels, fingerprint) after the pipeline's layout and manifest checks."""
    from shared.dataset import MARKER_NAME, DatasetLayoutError, check_manifest, parse_manifest, scan_relpaths

    bucket, key = parse_s3_uri(dataset_uri.rstrip("/") + "/")
    prefix = key if key.endswith("/") else key + "/"
    name = prefix.rstrip("/").rsplit("/", 1)[-1]
    rels = list_relpaths(s3, bucket, prefix)
    layout = scan_relpaths(rels)
    try:
        layout.check()
    except DatasetLayoutError as exc:
        raise DatasetInvalid(f"dataset {dataset_uri}: {exc}") from None
    if MARKER_NAME in rels:
        manifest = parse_manifest(s3.get_object(Bucket=bucket, Key=prefix + MARKER_NAME)["Body"].read())
        problems = check_manifest(manifest, layout)
        if problems:
            raise DatasetInvalid(f"dataset {dataset_uri} does not match its _READY manifest: " + "; ".join(problems))
    else:
        LOG.warning("no %s marker under %s: training on what is there now", MARKER_NAME, dataset_uri)
    return name, channels(bucket, prefix, layout), layout.fingerprint()


def build_estimator(config: Config, *, role: str, image_uri: str, artifacts_bucket: str,
                    job_name: str, session: Any, kms_key: str | None = None,
                    tags: list[dict[str, str]] | None = None) -> Any:
    """The SDK estimator for one job; every setting comes from ``config``."""
    from sagemaker.estimator import Estimator

    return Estimator(
        image_uri=image_uri,
        role=role,
        instance_type=config.training_instance_type,
        instance_count=config.training_instance_count,
        volume_size=config.training_volume_size_gb,
        volume_kms_key=kms_key if kms_key and config.training_volume_kms() else None,
        use_spot_instances=config.use_spot_instances,
        max_run=config.max_runtime_seconds,
        max_wait=config.max_wait_seconds if config.use_spot_instances else None,
        # Already JSON-encoded (Config.training_hyperparameters): the generic estimator sends them as they are.
        hyperparameters=config.training_hyperparameters(),
        metric_definitions=[dict(m) for m in METRIC_DEFINITIONS],
        enable_sagemaker_metrics=True,
        enable_network_isolation=config.training_network_isolation,
        encrypt_inter_container_traffic=config.training_instance_count > 1,
        subnets=list(config.training_vpc_subnet_ids) or None,
        security_group_ids=list(config.training_vpc_security_group_ids) or None,
        checkpoint_s3_uri=f"s3://{artifacts_bucket}/{CHECKPOINTS_PREFIX}{job_name}/",
        checkpoint_local_path=CHECKPOINT_LOCAL_PATH,
        output_path=f"s3://{artifacts_bucket}/{MODELS_PREFIX}",
        output_kms_key=kms_key,
        environment={"PYTHONUNBUFFERED": "1"},
        tags=tags,
        # The pipeline's job has neither; keep the two jobs identical.
        debugger_hook_config=False,
        disable_profiler=True,
        sagemaker_session=session,
    )


def launch(args: argparse.Namespace, *, boto_session: Any = None) -> dict[str, Any]:
    import boto3

    overrides = dict(kv.split("=", 1) for kv in args.context)
    if args.instance_type:
        overrides["trainingInstanceType"] = args.instance_type
    if args.no_spot:
        overrides["useSpotInstances"] = "false"
    config = load(overrides)
    boto_session = boto_session or boto3.Session(region_name=args.region or config.region or None)
    region = boto_session.region_name
    if not region:
        raise LaunchError("no AWS region: pass --region or set AWS_REGION")
    given_image = args.image_uri or config.training_image_uri
    outputs: dict[str, str] | None = {}
    if not (args.role and args.artifacts_bucket and given_image and args.kms_key):
        outputs = stack_outputs(boto_session.client("cloudformation"), config.stack_name)
    where = (f"no deployed stack {config.stack_name} in {region}" if outputs is None
             else f"the stack {config.stack_name} in {region} has no such output")
    outputs = outputs or {}
    role = args.role or outputs.get("SageMakerRoleArn")
    artifacts = args.artifacts_bucket or outputs.get("ArtifactsBucketName")
    kms_key = args.kms_key or outputs.get("DataKeyArn")
    image_uri = given_image or outputs.get("TrainingImage")
    if not image_uri:
        raise LaunchError(f"no training image ({where}: TrainingImage): deploy the stack or pass --image-uri")
    if not role or not artifacts:
        raise LaunchError(f"no role or artifacts bucket ({where}: SageMakerRoleArn, ArtifactsBucketName): "
                          "deploy the stack or pass --role and --artifacts-bucket")
    s3 = boto_session.client("s3")
    name, input_channels, fingerprint = dataset_channels(s3, args.dataset)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    job_name = args.job_name or run_id(name, f"launch:{stamp}:{hashlib.sha256(os.urandom(8)).hexdigest()}")

    import sagemaker
    from sagemaker.inputs import TrainingInput

    session = sagemaker.Session(boto_session=boto_session, default_bucket=artifacts)
    estimator = build_estimator(
        config, role=role, image_uri=image_uri,
        artifacts_bucket=artifacts, job_name=job_name, session=session, kms_key=kms_key,
        tags=[{"Key": "cxr:dataset", "Value": name}, {"Key": "cxr:run-id", "Value": job_name},
              {"Key": "cxr:dataset-fingerprint", "Value": fingerprint}])
    inputs = {c["ChannelName"]: TrainingInput(c["DataSource"]["S3DataSource"]["S3Uri"], input_mode="File")
              for c in input_channels}
    estimator.fit(inputs=inputs, job_name=job_name, wait=args.wait, logs="All" if args.wait else None)
    result = {"job_name": job_name, "region": region,
              "console": f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job_name}"}
    if args.wait:
        desc = session.describe_training_job(job_name)
        result["status"] = desc["TrainingJobStatus"]
        result["model_uri"] = desc.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True,
                   help="s3://<data bucket>/datasets/<name>/, as python -m infra.upload writes it")
    p.add_argument("--role", help="SageMaker execution role ARN (default: the stack's SageMakerRoleArn output)")
    p.add_argument("--instance-type", help="instance type, e.g. ml.g5.xlarge or ml.m5.xlarge (default: cdk.json trainingInstanceType)")
    p.add_argument("--no-spot", action="store_true", help="on-demand capacity instead of managed spot (default: off: cdk.json useSpotInstances decides)")
    p.add_argument("--wait", action="store_true", help="stream the job's log and wait for it to end")
    p.add_argument("--job-name", help="training job name (default: derived from the dataset name)")
    p.add_argument("--artifacts-bucket",
                   help="bucket for the model and checkpoints (default: the stack's ArtifactsBucketName output)")
    p.add_argument("--image-uri",
                   help="training image (default: cdk.json trainingImageUri, else the stack's TrainingImage output)")
    p.add_argument("--kms-key", help="KMS key for the model artifacts (default: the stack's DataKeyArn output)")
    p.add_argument("--region", help="AWS region (default: cdk.json's region, else the AWS CLI's)")
    p.add_argument("-c", "--context", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cdk.json context value, as with cdk -c (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    args = build_parser().parse_args(argv)
    bad = [kv for kv in args.context if "=" not in kv]
    if bad:
        print(f"launch: -c expects KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    try:
        result = launch(args)
    except (LaunchError, ConfigError, StepError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"launch: {describe(exc, args.dataset)}", file=sys.stderr)
        return 1
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0 if not args.wait or result.get("status") == "Completed" else 1


if __name__ == "__main__":
    sys.exit(main())
