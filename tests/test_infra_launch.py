"""`python -m infra.launch` under moto: the CreateTrainingJob it sends matches the pipeline's config."""

from __future__ import annotations

import json
import re

import boto3  # noqa: E402
import moto  # noqa: E402,F401
import pytest

from infra import launch  # noqa: E402
from infra.config import METRIC_DEFINITIONS, load  # noqa: E402

REGION = "us-east-1"
DATA, ARTIFACTS = "cxr-data-launch", "cxr-artifacts-launch"
ROLE = "arn:aws:iam::123456789012:role/cxr-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cdk-hnb659fds-container-assets-123456789012-us-east-1:abc123"
SAMPLE_LINE = "epoch=3 train_loss=0.1234 val_loss=0.2345 val_auc=0.9876 val_acc=0.9500 lr=0.000100"


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    monkeypatch.setenv("SAGEMAKER_TELEMETRY_OPT_OUT", "true")
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    with moto.mock_aws():
        session = boto3.Session(region_name=REGION)
        s3 = session.client("s3")
        for bucket in (DATA, ARTIFACTS):
            s3.create_bucket(Bucket=bucket)
        for cls, n in (("NORMAL", 2), ("PNEUMONIA", 3)):
            for i in range(n):
                s3.put_object(Bucket=DATA, Key=f"datasets/demo/train/{cls}/IM-{i:04d}-0001.jpeg", Body=b"x")
        yield session


def run_launch(session, *argv):
    args = launch.build_parser().parse_args(["--dataset", f"s3://{DATA}/datasets/demo/", "--role", ROLE,
                                             "--artifacts-bucket", ARTIFACTS, "--image-uri", IMAGE, *argv])
    sent = []
    original_client = session.client

    def client(name, *a, **kw):
        c = original_client(name, *a, **kw)
        if name == "sagemaker":
            c.meta.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                                   lambda params, **_: sent.append(json.loads(json.dumps(params, default=str))))
        return c

    session.client = client
    result = launch.launch(args, boto_session=session)
    assert len(sent) == 1
    return result, sent[0], original_client("sagemaker").describe_training_job(TrainingJobName=result["job_name"])


def test_launch_sends_the_pipeline_configuration(aws):
    config = load()
    result, request, job = run_launch(aws)
    name = result["job_name"]
    assert name.startswith("cxr-demo-")

    # JSON-encoded exactly as the state machine sends them; no submit directory: the code is in the image
    assert request["HyperParameters"] == config.training_hyperparameters()
    assert not [k for k in request["HyperParameters"] if k.startswith("sagemaker_")]
    assert request["EnableNetworkIsolation"] is True
    assert not request.get("EnableInterContainerTrafficEncryption")
    assert "VpcConfig" not in request and "VolumeKmsKeyId" not in request["ResourceConfig"]

    algo = request["AlgorithmSpecification"]
    assert algo["MetricDefinitions"] == [dict(m) for m in METRIC_DEFINITIONS]
    assert algo["TrainingImage"] == IMAGE
    assert algo["EnableSageMakerMetricsTimeSeries"] is True

    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": config.max_runtime_seconds,
                                            "MaxWaitTimeInSeconds": config.max_wait_seconds}
    assert request["CheckpointConfig"] == {"S3Uri": f"s3://{ARTIFACTS}/checkpoints/{name}/",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["ResourceConfig"]["InstanceType"] == config.training_instance_type
    assert request["OutputDataConfig"]["S3OutputPath"] == f"s3://{ARTIFACTS}/models/"
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train"]
    assert {"Key": "cxr:dataset", "Value": "demo"} in request["Tags"]

    # moto records the job as sent
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{ARTIFACTS}/checkpoints/{name}/"
    assert job["HyperParameters"]["recipe"] == config.training_hyperparameters()["recipe"] == '"gpu"'
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert "Contents" not in aws.client("s3").list_objects_v2(Bucket=ARTIFACTS, Prefix="code/")  # nothing uploaded


def test_launch_overrides_instance_type_and_spot(aws):
    _, request, _ = run_launch(aws, "--instance-type", "ml.m5.xlarge", "--no-spot", "-c", "maxRuntimeSeconds=600",
                               "-c", "trainingInstanceCount=2", "-c", 'trainingVpcSubnetIds=["subnet-1"]',
                               "-c", 'trainingVpcSecurityGroupIds=["sg-1"]', "--kms-key", "arn:aws:kms:us-east-1:123456789012:key/k")
    assert request["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/k"
    assert request["EnableInterContainerTrafficEncryption"] is True
    assert request["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
    assert not request.get("EnableManagedSpotTraining")
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 600}


def test_launch_refuses_a_dataset_missing_a_class(aws):
    aws.client("s3").put_object(Bucket=DATA, Key="datasets/half/train/NORMAL/IM-0001-0001.jpeg", Body=b"x")
    args = launch.build_parser().parse_args(["--dataset", f"s3://{DATA}/datasets/half", "--role", ROLE,
                                             "--artifacts-bucket", ARTIFACTS, "--image-uri", IMAGE])
    with pytest.raises(launch.DatasetInvalid, match="PNEUMONIA"):
        launch.launch(args, boto_session=aws)


def test_metric_definitions_match_the_training_log_line():
    found = {m["Name"]: float(re.search(m["Regex"], SAMPLE_LINE).group(1)) for m in METRIC_DEFINITIONS}
    assert found == {"train_loss": 0.1234, "val_loss": 0.2345, "val_auc": 0.9876, "val_acc": 0.95, "lr": 0.0001}


def test_launch_needs_a_training_image(aws):
    args = launch.build_parser().parse_args(["--dataset", f"s3://{DATA}/datasets/demo/", "--role", ROLE,
                                             "--artifacts-bucket", ARTIFACTS])
    with pytest.raises(launch.LaunchError, match="TrainingImage"):
        launch.launch(args, boto_session=aws)


def _args(*extra):
    return launch.build_parser().parse_args(["--dataset", f"s3://{DATA}/datasets/demo/", *extra])


def _stubbed_cfn(code, message, status):
    from botocore.stub import Stubber

    cfn = boto3.client("cloudformation", region_name=REGION)
    stub = Stubber(cfn)
    stub.add_client_error("describe_stacks", service_error_code=code, service_message=message,
                          http_status_code=status)
    stub.activate()
    return cfn


def test_no_deployed_stack_is_said_as_such(aws):
    stack = load().stack_name
    assert launch.stack_outputs(aws.client("cloudformation"), stack) is None
    with pytest.raises(launch.LaunchError, match=f"^no role or artifacts bucket \\(no deployed stack {stack} in "
                                                  f"{REGION}: SageMakerRoleArn, ArtifactsBucketName\\)"):
        launch.launch(_args("--image-uri", IMAGE), boto_session=aws)


def test_access_denied_is_not_taken_for_a_missing_stack():
    cfn = _stubbed_cfn("AccessDenied", "User: arn:aws:iam::123456789012:user/x is not authorized to perform: "
                                       "cloudformation:DescribeStacks", 403)
    with pytest.raises(launch.LaunchError) as err:
        launch.stack_outputs(cfn, "cxr-stack")
    text = str(err.value)
    assert text.startswith("cannot read the outputs of the stack cxr-stack: access denied: the AWS credentials in use "
                           "may not call DescribeStacks on stack cxr-stack (User: arn:aws:iam::123456789012:user/x is "
                           "not authorized to perform: cloudformation:DescribeStacks)")
    assert "no deployed stack" not in text


def test_another_error_keeps_its_reason():
    cfn = _stubbed_cfn("Throttling", "Rate exceeded", 400)
    with pytest.raises(launch.LaunchError, match="^cannot read the outputs of the stack s: DescribeStacks failed on "
                                                 "stack s: Throttling: Rate exceeded"):
        launch.stack_outputs(cfn, "s")


def test_missing_credentials_are_one_line(no_aws_credentials, capsys):
    code = launch.main(["--dataset", f"s3://{DATA}/datasets/demo/", "--region", REGION])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"launch: cannot read the outputs of the stack {load().stack_name}: no AWS credentials found: run "
        "`aws configure` or `aws sso login`, or set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). "
        "Pass --role, --artifacts-bucket, --image-uri and --kms-key to launch without reading it"]


def test_a_missing_dataset_bucket_is_one_line(aws, capsys):
    code = launch.main(["--dataset", "s3://no-such-data/datasets/demo/", "--role", ROLE,
                        "--artifacts-bucket", ARTIFACTS, "--image-uri", IMAGE])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("launch: bucket no-such-data does not exist: check the bucket name "
                                            "and the region")


def test_given_every_stack_value_the_stack_is_not_read(aws):
    cfn = _stubbed_cfn("AccessDenied", "denied", 403)  # would fail if called
    original = aws.client
    aws.client = lambda name, *a, **kw: cfn if name == "cloudformation" else original(name, *a, **kw)
    args = _args("--role", ROLE, "--artifacts-bucket", ARTIFACTS, "--image-uri", IMAGE,
                 "--kms-key", "arn:aws:kms:us-east-1:123456789012:key/k")
    assert launch.launch(args, boto_session=aws)["job_name"].startswith("cxr-demo-")


def test_rollback_and_batch_commands_without_credentials_say_so_in_one_line(no_aws_credentials, monkeypatch, capsys):
    from infra import batch_predict, promote

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert promote.main(["list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nothing moved: no AWS credentials found") and "\n" not in err
    assert batch_predict.main(["--input", "s3://data/in/", "--output", "s3://data/batch/out.csv"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("batch not run: no AWS credentials found") and "Traceback" not in err
