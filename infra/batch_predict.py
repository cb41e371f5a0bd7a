"""Score every image under an S3 prefix with the model in service (or a named version).

    python -m infra.batch_predict --input s3://DATA_BUCKET/incoming/2026-11/ \\
        --output s3://DATA_BUCKET/batch/2026-11/predictions.csv
    python -m infra.batch_predict --input ... --output ... --model-version 20261126-101500-ab12cd

Writes one CSV row per object: key, label, probability (of PNEUMONIA), threshold, model version,
or the error code and reason for a file that is not a usable X-ray; a bad file never stops the
batch. In the cloud it starts the stack's ``BatchPredict`` state machine (a Distributed Map over
the S3 listing: many scoring Lambdas at once) and prints its progress until it ends; the input
must be in the stack's data bucket and the output under its ``batch/`` prefix, outside the input
prefix (:func:`infra.functions.batch.location_problem`, the same rules in the twin). Against the
local twin (``--twin``, which reads its endpoints from its state folder) the same scoring and
merge functions run over the same listing in this process. An empty input prefix, a wrong
location or a local path is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from .aws_errors import report_aws_failure
from .functions.batch import location_problem, run_locally
from .functions.common import Clients, Settings, StepContext, parse_s3_uri, promoted_pointer
from .functions.images import image_keys
from .promote import PromotionError, approved_models
from .twin.endpoints import TwinEndpointError, add_twin_arguments, twin_clients, twin_state_for

POLL_SECONDS = 5.0


def choose_model(ssm: Any, sagemaker: Any, parameter: str, group: str, version: str | None) -> dict[str, str]:
    """The in-service model (the pointer), or the approved package with ``version``."""
    if not version:
        p = promoted_pointer(ssm, parameter)
        if p is None:
            raise PromotionError("no model is in service; name one with --model-version")
        return {"model_uri": p.model_uri, "sha256": p.sha256, "model_version": p.model_version}
    for m in approved_models(sagemaker, group):
        if version in (m.model_version, m.package_arn):
            return {"model_uri": m.model_uri, "sha256": m.sha256, "model_version": m.model_version}
    raise PromotionError(f"no approved model package {version!r} in {group}")


def job_input(input_uri: str, output_uri: str, model: dict[str, str]) -> dict[str, Any]:
    in_bucket, prefix = parse_s3_uri(input_uri.rstrip("/") + "/x")
    prefix = prefix[:-1]
    out_bucket, out_key = parse_s3_uri(output_uri)
    if not out_key.endswith(".csv"):
        raise PromotionError(f"--output {output_uri} must name a .csv object")
    work = f"s3://{out_bucket}/{out_key}.parts-{uuid.uuid4().hex[:8]}/"
    return {"input_uri": input_uri, "input_bucket": in_bucket, "input_prefix": prefix, "output_uri": output_uri,
            "work_uri": work, "model_uri": model["model_uri"], "sha256": model["sha256"]}


def run_cloud(sfn: Any, cfn: Any, stack: str, job: dict[str, Any], say=print) -> dict[str, Any]:
    from .launch import stack_outputs

    outputs = stack_outputs(cfn, stack)
    if "BatchStateMachineArn" not in outputs:
        raise PromotionError(f"stack {stack} has no BatchStateMachineArn output: deploy this version first")
    problem = location_problem(job["input_uri"], job["output_uri"], outputs.get("DataBucketName", ""))
    if problem:
        raise PromotionError(problem)
    arn = sfn.start_execution(stateMachineArn=outputs["BatchStateMachineArn"], input=json.dumps(job))["executionArn"]
    say(f"started {arn}")
    while True:
        desc = sfn.describe_execution(executionArn=arn)
        runs = sfn.list_map_runs(executionArn=arn).get("mapRuns", [])
        if runs:
            counts = sfn.describe_map_run(mapRunArn=runs[0]["mapRunArn"]).get("itemCounts", {})
            say(f"  {counts.get('succeeded', 0)}/{counts.get('total', '?')} batches done, "
                f"{counts.get('failed', 0)} failed, {counts.get('running', 0)} running")
        if desc["status"] != "RUNNING":
            break
        time.sleep(POLL_SECONDS)
    if desc["status"] != "SUCCEEDED":
        raise PromotionError(f"the batch ended {desc['status']}: {desc.get('cause') or desc.get('error') or ''}")
    return json.loads(desc["output"])["result"]


def main(argv: list[str] | None = None) -> int:
    from .config import load
    from .names import model_package_group_name, pointer_parameter_name

    p = argparse.ArgumentParser(prog="python -m infra.batch_predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="s3://bucket/prefix/ holding the images")
    p.add_argument("--output", required=True, help="s3://bucket/key.csv for the predictions")
    p.add_argument("--model-version", help="an approved model version or package ARN (default: the model in service)")
    p.add_argument("--stack-name", default=load().stack_name, help="the deployed stack (default: cdk.json stackName)")
    p.add_argument("--region", help="AWS region (default: your AWS configuration)")
    add_twin_arguments(p)
    args = p.parse_args(argv)
    parameter, group = pointer_parameter_name(args.stack_name), model_package_group_name(args.stack_name)
    try:
        twin = twin_state_for(args)
        if twin is not None:
            problem = location_problem(args.input, args.output, twin.data_bucket)
            if problem:
                raise PromotionError(problem)
            s3, ssm, sm = twin_clients(twin, "s3", "ssm", "sagemaker")
        else:
            import boto3

            for option, uri in (("--input", args.input), ("--output", args.output)):
                if not uri.startswith("s3://"):
                    raise PromotionError(f"{option} {uri} is not an s3:// URI: batch reads and writes S3 only")
            session = boto3.session.Session(region_name=args.region)
            s3, ssm, sm = session.client("s3"), session.client("ssm"), session.client("sagemaker")
        model = choose_model(ssm, sm, parameter, group, args.model_version)
        job = job_input(args.input, args.output, model)
        if not image_keys(s3, args.input)[1]:
            raise PromotionError(f"no objects under {args.input}: check the prefix (a typo, or the images are "
                                 "not uploaded yet)")
        print(f"scoring s3://{job['input_bucket']}/{job['input_prefix']} with {model['model_version']}")
        if twin is not None:
            result = run_locally(job, StepContext(Settings(), Clients(s3=s3)),
                                 progress=lambda done, total: print(f"  {done}/{total} batches done", flush=True))
        else:
            result = run_cloud(session.client("stepfunctions"), session.client("cloudformation"), args.stack_name, job)
    except (PromotionError, TwinEndpointError) as exc:
        print(f"batch not run: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - an AWS failure is told in one line; anything else is a bug
        return report_aws_failure(exc, "batch not run", args.input)
    print(f"wrote {result['rows']} rows to {result['output_uri']}: {result['scored']} scored, "
          f"{result['refused']} refused (error_code says why)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
