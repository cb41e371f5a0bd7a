"""The synthesized stack: storage, trigger, state machine, training job, API, function, alarms,
IAM scope and cdk-nag, asserted on the CloudFormation template and the cloud assembly.

The stack is synthesized once per session (jsii synthesis is slow); cdk-nag runs inside that
synthesis as CDK policy-validation plugins, so a finding without an acknowledgment fails the fixture.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
import aws_cdk as cdk  # noqa: E402
import cdk_nag  # noqa: E402
from aws_cdk.assertions import Annotations, Match, Template  # noqa: E402

from infra.app import build_app  # noqa: E402
from infra.config import METRIC_DEFINITIONS, ROOT, ConfigError, load  # noqa: E402
from infra.constructs.serving import INFERENCE_DOCKERFILE  # noqa: E402
from infra.names import (  # noqa: E402
    BINARY_MEDIA_TYPES,
    dataset_ready_pattern,
    model_package_group_name,
    pointer_parameter_name,
)
from infra.packaging import stage_training_context  # noqa: E402
from infra.pipeline import PIPELINE, STEPS  # noqa: E402
from infra.twin.training import hyperparameter_args  # noqa: E402
from training_job.container import decode_hyperparameters, to_cmd_args, user_hyperparameters  # noqa: E402

SAMPLE_LINE = "epoch=3 train_loss=0.1234 val_loss=0.2345 val_auc=0.9876 val_acc=0.9500 lr=0.000100"


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("cdk.out")
    assert (ROOT / INFERENCE_DOCKERFILE).is_file(), "the stack packages inference_lambda/Dockerfile"
    app, stack = build_app(outdir=str(outdir), source_root=ROOT)
    assembly = app.synth()  # raises on any unacknowledged cdk-nag finding
    artifact = assembly.get_stack_by_name(stack.stack_name)
    return {"app": app, "stack": stack, "outdir": Path(outdir), "template": artifact.template}


@pytest.fixture(scope="session")
def template(synthesized) -> Template:
    return Template.from_json(synthesized["template"])


@pytest.fixture(scope="session")
def resources(synthesized) -> dict:
    return synthesized["template"]["Resources"]


def of_type(resources: dict, kind: str) -> dict:
    return {k: v for k, v in resources.items() if v["Type"] == kind}


def flatten(value) -> str:
    """A CloudFormation string with its tokens replaced by TOKEN (for parsing and matching)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return sep.join(flatten(p) for p in parts)
    if isinstance(value, dict) and isinstance(value.get("Fn::Sub"), str):
        return value["Fn::Sub"]
    return "TOKEN"


def find_logical_id(resources: dict, kind: str, path_fragment: str) -> str:
    ids = [k for k, v in of_type(resources, kind).items() if path_fragment in k]
    assert len(ids) == 1, (kind, path_fragment, ids)
    return ids[0]


# ---------------------------------------------------------------- storage


def test_three_buckets_private_encrypted_versioned(resources):
    buckets = of_type(resources, "AWS::S3::Bucket")
    assert len(buckets) == 3
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                                           "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}
        sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
        if "AccessLogs" in name:
            assert sse == {"SSEAlgorithm": "AES256"}  # the only encryption S3 log delivery accepts
        else:
            assert sse["SSEAlgorithm"] == "aws:kms" and "KMSMasterKeyID" in sse
            assert props["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": find_logical_id(resources, "AWS::S3::Bucket", "AccessLogs")}
        assert bucket["DeletionPolicy"] == "Retain"


def test_every_bucket_policy_denies_plain_http(resources):
    policies = of_type(resources, "AWS::S3::BucketPolicy")
    assert len(policies) == 3
    for policy in policies.values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        assert any(s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
                   for s in statements)


def test_lifecycle_rules(resources):
    artifacts = resources[find_logical_id(resources, "AWS::S3::Bucket", "StorageArtifacts")]["Properties"]
    rules = {r["Id"]: r for r in artifacts["LifecycleConfiguration"]["Rules"]}
    cfg = load()
    assert rules["ExpireCheckpoints"]["Prefix"] == "checkpoints/"
    assert rules["ExpireCheckpoints"]["ExpirationInDays"] == cfg.checkpoint_expiration_days
    assert rules["ExpireRejectedModels"]["Prefix"] == "models/"
    assert rules["ExpireRejectedModels"]["TagFilters"] == [{"Key": "cxr-approval", "Value": "Rejected"}]
    assert rules["ExpireRejectedModels"]["ExpirationInDays"] == cfg.rejected_model_expiration_days
    assert rules["ExpireNoncurrentVersions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == \
        cfg.noncurrent_version_expiration_days
    data = resources[find_logical_id(resources, "AWS::S3::Bucket", "StorageData")]["Properties"]
    assert {r["Id"] for r in data["LifecycleConfiguration"]["Rules"]} >= {"ExpireNoncurrentVersions", "AbortIncompleteUploads"}


def test_data_bucket_sends_events_to_eventbridge(resources):
    data = resources[find_logical_id(resources, "AWS::S3::Bucket", "StorageData")]["Properties"]
    assert data["NotificationConfiguration"] == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}
    assert not of_type(resources, "Custom::S3BucketNotifications")


# ---------------------------------------------------------------- trigger


def test_rule_matches_only_dataset_markers(resources):
    rules = of_type(resources, "AWS::Events::Rule")
    assert len(rules) == 1
    rule = next(iter(rules.values()))["Properties"]
    pattern = rule["EventPattern"]
    bucket_ref = {"Ref": find_logical_id(resources, "AWS::S3::Bucket", "StorageData")}
    # The local twin applies this same pattern (infra.twin.trigger).
    assert pattern == dataset_ready_pattern(bucket_ref)
    assert pattern["source"] == ["aws.s3"]
    assert pattern["detail-type"] == ["Object Created"]
    assert pattern["detail"]["bucket"]["name"] == [bucket_ref]
    [key_filter] = pattern["detail"]["object"]["key"]
    wildcard = key_filter["wildcard"]
    assert wildcard.startswith("datasets/") and wildcard.endswith("/_READY")
    # EventBridge's * matches any characters, like fnmatch's
    assert fnmatch.fnmatchcase("datasets/kaggle/_READY", wildcard)
    for key in ("datasets/kaggle/train/NORMAL/IM-0001-0001.jpeg", "datasets/kaggle/_READY.tmp", "other/x/_READY"):
        assert not fnmatch.fnmatchcase(key, wildcard)
    [target] = rule["Targets"]
    assert target["Arn"]["Fn::GetAtt"][0].startswith("TrainingStarterFunction")
    assert "DeadLetterConfig" in target and target["RetryPolicy"]["MaximumRetryAttempts"] > 0


# ---------------------------------------------------------------- state machine


def machine_definition(resources, path_fragment: str) -> dict:
    logical = find_logical_id(resources, "AWS::StepFunctions::StateMachine", path_fragment)
    return json.loads(flatten(resources[logical]["Properties"]["DefinitionString"]))


@pytest.fixture(scope="session")
def definition(resources) -> dict:
    return machine_definition(resources, "TrainingStateMachine")


def main_line(definition: dict) -> list[str]:
    order, name = [], definition["StartAt"]
    while name:
        state = definition["States"][name]
        order.append(name)
        if state["Type"] == "Choice":
            name = state["Choices"][0]["Next"]
        else:
            name = state.get("Next")
    return order


def test_state_machine_follows_the_step_list(definition):
    assert main_line(definition) == [s.name for s in STEPS] + ["RunSucceeded"]
    states = definition["States"]
    choice = states["IsApproved"]
    assert choice["Choices"][0]["Variable"] == "$.gate.approved" and choice["Choices"][0]["BooleanEquals"] is True
    assert choice["Default"] == "NotifyRejected"
    assert states["NotifyRejected"]["Next"] == "RunEndedWithoutPromotion"
    assert states["NotifyFailure"]["Next"] == "RunFailed" and states["RunFailed"]["Type"] == "Fail"
    for step in (*STEPS, *PIPELINE.branches.values()):
        if step.kind == "choice":
            continue
        state = states[step.name]
        assert state["ResultPath"] == f"$.{step.result_key}"
        assert state["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "NotifyFailure"}]


def test_evaluate_step_feeds_the_gate_and_is_sized_from_the_step(definition, resources):
    states = definition["States"]
    assert states["TrainModel"]["Next"] == "EvaluateModel" and states["EvaluateModel"]["Next"] == "QualityGate"
    step = PIPELINE.step("EvaluateModel")
    functions = {k: v for k, v in of_type(resources, "AWS::Lambda::Function").items() if "EvaluateFunction" in k}
    [fn] = functions.values()
    assert fn["Properties"]["MemorySize"] == step.memory_mb == 10240 and fn["Properties"]["Timeout"] == step.timeout_s
    env = fn["Properties"]["Environment"]["Variables"]
    assert json.loads(env["GATE_CONFIG"])["non_inferiority_margin"] == load().gate_non_inferiority_margin
    register = next(v for k, v in of_type(resources, "AWS::Lambda::Function").items() if "RegisterFunction" in k)
    assert "SERVING_IMAGE_URI" in register["Properties"]["Environment"]["Variables"]


def test_batch_inference_is_a_distributed_map_over_the_s3_listing(resources):
    batch = machine_definition(resources, "BatchInferenceStateMachine")
    fan_out = batch["States"][batch["StartAt"]]
    assert fan_out["Type"] == "Map" and fan_out["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    assert fan_out["ItemReader"]["Resource"].endswith(":states:::s3:listObjectsV2")
    assert fan_out["ItemReader"]["Parameters"]["Prefix.$"] == "$.input_prefix"
    assert fan_out["ItemBatcher"]["MaxItemsPerBatch"] == 100 and fan_out["Next"] == "MergeParts"


def literal_json_paths(node, where="") -> list[str]:
    """Every place in a definition where a JSONPath is the value of a key without the ``.$`` suffix:
    Step Functions passes such a value on as the literal string, not the value it names."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            path_key = key.endswith((".$", "Path", "Variable"))  # ResultPath, InputPath, Choice Variable...
            if isinstance(value, str) and not path_key and (value == "$" or value.startswith(("$.", "$$.", "$["))):
                found.append(here)
            found += literal_json_paths(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += literal_json_paths(value, f"{where}[{i}]")
    return found


def test_no_definition_passes_a_json_path_on_as_a_literal_string(resources):
    machines = of_type(resources, "AWS::StepFunctions::StateMachine")
    assert len(machines) >= 2
    for logical, machine in machines.items():
        states = json.loads(flatten(machine["Properties"]["DefinitionString"]))
        assert literal_json_paths(states) == [], logical
    batch = machine_definition(resources, "BatchInferenceStateMachine")
    batch_input = batch["States"][batch["StartAt"]]["ItemBatcher"]["BatchInput"]
    assert {k: v for k, v in batch_input.items() if k != "bucket"} == {
        "model_uri.$": "$.model_uri", "sha256.$": "$.sha256", "work_uri.$": "$.work_uri"}


def test_training_step_is_a_sync_sagemaker_job(definition):
    train = definition["States"]["TrainModel"]
    assert train["Resource"].endswith(":states:::sagemaker:createTrainingJob.sync")
    p = train["Parameters"]
    cfg = load()
    assert p["TrainingJobName.$"] == "$.run.job_name"
    [retry] = train["Retry"]  # CreateTrainingJob refused for capacity or quota: the same name, later
    assert "SageMaker.ResourceLimitExceededException" in retry["ErrorEquals"] and "States.ALL" not in retry["ErrorEquals"]
    assert retry["BackoffRate"] > 1 and retry["MaxAttempts"] >= 3 and retry["JitterStrategy"] == "FULL"
    assert p["InputDataConfig.$"] == "$.dataset.channels"
    assert p["EnableManagedSpotTraining"] is True
    stop = p["StoppingCondition"]
    assert stop["MaxRuntimeInSeconds"] == cfg.max_runtime_seconds
    assert stop["MaxWaitTimeInSeconds"] >= stop["MaxRuntimeInSeconds"]
    assert p["CheckpointConfig"] == {"S3Uri.$": "$.run.checkpoint_uri", "LocalPath": "/opt/ml/checkpoints"}
    assert p["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert p["OutputDataConfig"]["S3OutputPath"].endswith("/models/")
    # JSON-encoded as the SDK sends them; the image's entrypoint turns them into the command line
    # the twin runs too.
    hp = p["HyperParameters"]
    assert hp == cfg.training_hyperparameters() and all(isinstance(v, str) for v in hp.values())
    assert hp["recipe"] == '"gpu"'
    assert to_cmd_args(user_hyperparameters(decode_hyperparameters(hp))) == hyperparameter_args(cfg.hyperparameters)
    # locked down by default: no network from the container; one instance, so nothing to encrypt between
    assert p["EnableNetworkIsolation"] is True
    assert p["EnableInterContainerTrafficEncryption"] is False
    assert "VpcConfig" not in p
    assert "VolumeKmsKeyId" not in p["ResourceConfig"]  # ml.g4dn: NVMe instance storage, encrypted in hardware
    assert {"Key": "cxr:dataset", "Value.$": "$.run.dataset_tag"} in p["Tags"]
    algo = p["AlgorithmSpecification"]
    assert algo["EnableSageMakerMetricsTimeSeries"] is True
    assert algo["MetricDefinitions"] == [dict(m) for m in METRIC_DEFINITIONS]


def test_metric_definitions_parse_the_epoch_line(definition):
    metrics = definition["States"]["TrainModel"]["Parameters"]["AlgorithmSpecification"]["MetricDefinitions"]
    values = {m["Name"]: float(re.search(m["Regex"], SAMPLE_LINE).group(1)) for m in metrics}
    assert values["train_loss"] == 0.1234 and values["val_loss"] == 0.2345
    assert values["val_auc"] == 0.9876 and values["val_acc"] == 0.95
    # a name never matches inside a longer one
    assert re.search(next(m["Regex"] for m in metrics if m["Name"] == "val_loss"), "train_loss=0.5") is None


def test_training_image_is_built_from_the_training_dockerfile(definition, synthesized, resources):
    assets = json.loads((synthesized["outdir"] / f"{synthesized['stack'].stack_name}.assets.json").read_text())
    [(asset_hash, image)] = [(h, a) for h, a in assets["dockerImages"].items()
                             if (synthesized["outdir"] / a["source"]["directory"] / "training_job" / "container.py").is_file()]
    staged = synthesized["outdir"] / image["source"]["directory"]
    assert (staged / "Dockerfile").read_bytes() == (ROOT / "training_job" / "Dockerfile").read_bytes()
    assert (staged / "requirements.txt").read_bytes() == (ROOT / "training_job" / "requirements.txt").read_bytes()
    assert not (staged / "infra").exists() and not (staged / "tests").exists()
    assert image["source"].get("platform") == "linux/amd64"
    uri = flatten(definition["States"]["TrainModel"]["Parameters"]["AlgorithmSpecification"]["TrainingImage"])
    assert uri.endswith(f":{asset_hash}")
    # the SageMaker role pulls from the assets repository only
    statements = [s for lid, s in policy_statements(resources) if lid.startswith("TrainingSageMakerExecutionRole")]
    [pull] = [s for s in statements if s.get("Sid") == "PullTrainingImage"]
    assert "container-assets" in flatten(pull["Resource"])


def test_state_machine_logs_everything_and_traces(resources):
    machines = of_type(resources, "AWS::StepFunctions::StateMachine").values()
    assert len(machines) == 2  # training and batch inference
    for machine in machines:
        props = machine["Properties"]
        assert props["LoggingConfiguration"]["Level"] == "ALL"
        assert props["TracingConfiguration"] == {"Enabled": True}


def test_registry_and_pointer(resources):
    [group] = of_type(resources, "AWS::SageMaker::ModelPackageGroup").values()
    assert group["Properties"]["ModelPackageGroupName"] == "CxrPneumonia-models"
    [param] = of_type(resources, "AWS::SSM::Parameter").values()
    assert param["Properties"]["Name"] == "/CxrPneumonia/promoted-model"
    # The local twin uses the same names.
    assert model_package_group_name("CxrPneumonia") == group["Properties"]["ModelPackageGroupName"]
    assert pointer_parameter_name("CxrPneumonia") == param["Properties"]["Name"]


# ---------------------------------------------------------------- serving


def test_api_binary_types_key_and_throttling(resources, template):
    cfg = load()
    [api] = of_type(resources, "AWS::ApiGateway::RestApi").values()
    assert api["Properties"]["BinaryMediaTypes"] == BINARY_MEDIA_TYPES
    methods = of_type(resources, "AWS::ApiGateway::Method")
    by_verb = {}
    for logical_id, m in methods.items():
        by_verb.setdefault(m["Properties"]["HttpMethod"], []).append((logical_id, m["Properties"]))
    [(post_id, post)] = by_verb["POST"]
    assert "predict" in post_id.lower() and post["ApiKeyRequired"] is True
    assert post["Integration"]["Type"] == "AWS_PROXY"
    assert len(by_verb["GET"]) == 2 and not any(p.get("ApiKeyRequired") for _, p in by_verb["GET"])
    template.has_resource_properties("AWS::ApiGateway::UsagePlan", {
        "Throttle": {"RateLimit": cfg.api_throttle_rate_limit, "BurstLimit": cfg.api_throttle_burst_limit},
        "Quota": {"Limit": cfg.api_quota_limit, "Period": cfg.api_quota_period},
    })
    template.resource_count_is("AWS::ApiGateway::UsagePlanKey", 1)
    template.has_resource_properties("AWS::ApiGateway::Stage", {
        "TracingEnabled": True,
        "AccessLogSetting": Match.object_like({"DestinationArn": Match.any_value()}),
        "MethodSettings": Match.array_with([Match.object_like({
            "HttpMethod": "*", "ResourcePath": "/*", "ThrottlingRateLimit": cfg.api_throttle_rate_limit,
            "ThrottlingBurstLimit": cfg.api_throttle_burst_limit, "DataTraceEnabled": False, "LoggingLevel": "ERROR"})]),
    })


def test_gateway_errors_use_the_api_error_shape(resources):
    responses = of_type(resources, "AWS::ApiGateway::GatewayResponse")
    assert {r["Properties"]["ResponseType"] for r in responses.values()} == {"DEFAULT_4XX", "DEFAULT_5XX"}
    for r in responses.values():
        assert '"error": {"code"' in r["Properties"]["ResponseTemplates"]["application/json"]


def test_inference_function_is_the_container_image(resources, synthesized):
    cfg = load()
    fns = of_type(resources, "AWS::Lambda::Function")
    [(_, inference)] = [(k, v) for k, v in fns.items() if k.startswith("ServingInferenceFunction")]
    props = inference["Properties"]
    assert props["PackageType"] == "Image"
    assert props["MemorySize"] == cfg.inference_memory_mb and props["Timeout"] == cfg.inference_timeout_seconds
    env = props["Environment"]["Variables"]
    assert env["MODEL_URI"] == {"Fn::Join": ["", ["ssm:", {"Ref": find_logical_id(resources, "AWS::SSM::Parameter", "Registry")}]]}
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == cfg.metrics_namespace
    assets = json.loads((synthesized["outdir"] / f"{synthesized['stack'].stack_name}.assets.json").read_text())
    images = [a["source"] for a in assets["dockerImages"].values()]
    inference_assets = [s for s in images if s.get("dockerFile") == INFERENCE_DOCKERFILE]
    assert len(inference_assets) == 1
    staged = synthesized["outdir"] / inference_assets[0]["directory"]
    assert (staged / INFERENCE_DOCKERFILE).is_file() and (staged / "shared" / "bundle.py").is_file()
    for absent in (".venv", ".git", "node_modules", "tests", "training_job", "infra", "cdk.out"):
        assert not (staged / absent).exists(), absent
    assert inference_assets[0].get("platform") == "linux/amd64"


def test_pipeline_functions_share_one_image_with_their_own_handlers(resources, synthesized):
    fns = {k: v["Properties"] for k, v in of_type(resources, "AWS::Lambda::Function").items()
           if k.startswith("Training")}
    commands = sorted(p["ImageConfig"]["Command"][0] for p in fns.values())
    assert commands == sorted(f"infra.functions.{m}.handler" for m in ["starter", *PIPELINE.lambda_modules()])
    assets = json.loads((synthesized["outdir"] / f"{synthesized['stack'].stack_name}.assets.json").read_text())
    sources = [a["source"] for a in assets["dockerImages"].values() if a["source"].get("dockerFile") != INFERENCE_DOCKERFILE
               and not (synthesized["outdir"] / a["source"]["directory"] / "training_job").is_dir()]
    assert len({s["directory"] for s in sources}) == 1


def test_training_context_is_reproducible(tmp_path):
    first = stage_training_context(tmp_path / "a")
    second = stage_training_context(tmp_path / "b")
    assert first.name == second.name
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


# ---------------------------------------------------------------- monitoring


def test_alarms_page_the_topic(resources):
    alarms = of_type(resources, "AWS::CloudWatch::Alarm")
    topic = find_logical_id(resources, "AWS::SNS::Topic", "Notifications")
    assert len(alarms) == 7
    for alarm in alarms.values():
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic}]
    joined = " ".join(alarms)
    for fragment in ("InferenceErrors", "Api5xx", "TrainingRunsFailed", "MarkersNotStarted", "ModelUnavailableBurst",
                     "ModelFallback", "PredictionMixDrift"):
        assert fragment in joined
    metrics = set()
    for alarm in alarms.values():
        props = alarm["Properties"]
        metrics.add(props.get("MetricName"))
        metrics.update(m.get("MetricStat", {}).get("Metric", {}).get("MetricName") for m in props.get("Metrics", []))
    assert {"Errors", "5XXError", "ExecutionsFailed", "ApproximateNumberOfMessagesVisible", "ModelFallback"} <= metrics


def test_dashboard_covers_serving_and_training(resources):
    [dashboard] = of_type(resources, "AWS::CloudWatch::Dashboard").values()
    body = flatten(dashboard["Properties"]["DashboardBody"])
    for needle in ('"Latency"', "p50", "p90", "p99", "4XXError", "5XXError", '"Duration"', '"Throttles"', '"ColdStart"',
                   "ExecutionsFailed", "ExecutionsSucceeded", "/aws/sagemaker/TrainingJobs", "val_auc",
                   '"PredictionsByLabel"', '"RejectedRequests"', '"ModelUnavailable"', '"ModelFallback"',
                   "Share of PNEUMONIA answers"):
        assert needle in body, needle


# ---------------------------------------------------------------- IAM


def policy_statements(resources):
    for logical_id, policy in of_type(resources, "AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            yield logical_id, statement


def as_list(x):
    return x if isinstance(x, list) else [x]


def test_no_wildcard_actions_anywhere(resources):
    for logical_id, statement in policy_statements(resources):
        for action in as_list(statement["Action"]):
            assert "*" not in action, (logical_id, action)


def test_sagemaker_role_reads_datasets_and_writes_only_its_prefixes(resources):
    role = find_logical_id(resources, "AWS::IAM::Role", "SageMakerExecutionRole")
    data = find_logical_id(resources, "AWS::S3::Bucket", "StorageData")
    artifacts = find_logical_id(resources, "AWS::S3::Bucket", "StorageArtifacts")
    statements = [s for lid, s in policy_statements(resources) if lid.startswith(role.replace("Role", "RoleDefaultPolicy")[:30])
                  or lid.startswith("TrainingSageMakerExecutionRoleDefaultPolicy")]
    assert statements
    writes, reads = set(), set()
    for s in statements:
        for action in as_list(s["Action"]):
            if not action.startswith("s3:"):
                continue
            for resource in as_list(s["Resource"]):
                flat = json.dumps(resource)
                if action == "s3:PutObject":
                    writes.add(flat)
                elif action == "s3:GetObject" and data in flat:
                    reads.add(flat)
    assert writes == {json.dumps({"Fn::Join": ["", [{"Fn::GetAtt": [artifacts, "Arn"]}, f"/{p}/*"]]})
                      for p in ("models", "checkpoints")}
    assert reads == {json.dumps({"Fn::Join": ["", [{"Fn::GetAtt": [data, "Arn"]}, "/datasets/*"]]})}


def test_inference_function_reads_only_models_and_the_pointer(resources):
    statements = [s for lid, s in policy_statements(resources) if lid.startswith("ServingInferenceFunctionRole")]
    actions = sorted(a for s in statements for a in as_list(s["Action"]))
    assert actions == ["kms:Decrypt", "logs:CreateLogStream", "logs:PutLogEvents", "s3:GetObject", "ssm:GetParameter"]
    [s3_statement] = [s for s in statements if s["Action"] == "s3:GetObject"]
    assert flatten(s3_statement["Resource"]).endswith("/models/*")


# ---------------------------------------------------------------- cdk-nag


def test_cdk_nag_has_no_unacknowledged_findings(synthesized):
    report = json.loads((synthesized["outdir"] / "validation-report.json").read_text())
    assert report["pluginReports"] == []
    for pack in (cdk_nag.AwsSolutionsChecks(), cdk_nag.HIPAASecurityChecks()):
        result = pack.validate_scope(synthesized["app"])
        assert result.success, [(v.rule_name, [r.construct_path for r in v.violating_resources]) for v in result.violations]
    annotations = Annotations.from_stack(synthesized["stack"])
    assert annotations.find_error("*", Match.any_value()) == []
    assert annotations.find_warning("*", Match.any_value()) == []


def test_every_acknowledgment_carries_a_product_specific_reason(synthesized):
    key = cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY
    seen = 0
    for construct in synthesized["app"].node.find_all():
        for entry in construct.node.metadata:
            if entry.type != key:
                continue
            for rule, reason in entry.data.items():
                seen += 1
                text = reason if isinstance(reason, str) else json.dumps(reason)
                assert len(text) >= 60, (construct.node.path, rule, text)
    assert seen >= 10


# ---------------------------------------------------------------- configuration


def test_context_strings_are_converted_and_checked():
    cfg = load({"useSpotInstances": "false", "maxRuntimeSeconds": "3600", "gateThresholds": '{"roc_auc": 0.8}',
                "corsAllowOrigins": "https://a.example, https://b.example"})
    assert cfg.use_spot_instances is False and cfg.max_runtime_seconds == 3600
    assert cfg.gate_thresholds == {"roc_auc": 0.8}
    assert cfg.cors_allow_origins == ["https://a.example", "https://b.example"]
    with pytest.raises(ConfigError, match="maxWaitSeconds"):
        load({"maxRuntimeSeconds": "20000", "maxWaitSeconds": "10000"})
    with pytest.raises(ConfigError, match="sagemaker_"):
        load({"hyperparameters": '{"sagemaker_program": "x.py"}'})


def test_options_are_checked():
    with pytest.raises(ConfigError, match="go together"):
        load({"trainingVpcSubnetIds": '["subnet-1"]'})
    with pytest.raises(ConfigError, match="cognitoUserPoolArn"):
        load({"apiAuthorization": "cognito"})
    with pytest.raises(ConfigError, match="apiAuthorization"):
        load({"apiAuthorization": "basic"})
    with pytest.raises(ConfigError, match="cannot be combined"):
        load({"corsAllowOrigins": "*, https://a.example"})
    with pytest.raises(ConfigError, match="not an origin"):
        load({"corsAllowOrigins": "https://a.example/page"})
    with pytest.raises(ConfigError, match="cannot exceed"):
        load({"inferenceReservedConcurrency": "2", "inferenceProvisionedConcurrency": "5"})
    with pytest.raises(ConfigError, match="low < high"):
        load({"predictionMixBand": '{"low": 0.9, "high": 0.5}'})


# ---------------------------------------------------------------- options switched on

POOL = "arn:aws:cognito-idp:eu-west-1:123456789012:userpool/eu-west-1_AbCdEf123"
OPTIONS = {
    "trainingVpcSubnetIds": ["subnet-0a1b", "subnet-0c2d"], "trainingVpcSecurityGroupIds": ["sg-0e3f"],
    "trainingInstanceCount": 2, "trainingInstanceType": "ml.m5.xlarge", "trainingNetworkIsolation": False,
    "apiAuthorization": "cognito", "cognitoUserPoolArn": POOL, "wafEnabled": True, "wafRateLimit": 300,
    "inferenceReservedConcurrency": 10, "inferenceProvisionedConcurrency": 2, "monthlyBudgetUsd": 50,
    "corsAllowOrigins": ["https://a.example", "https://b.example"], "maxTrainingRunsPerDay": 0,
    "predictionMixBand": {"low": 0.3, "high": 0.8, "window_hours": 12, "min_predictions": 50},
}


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    """Every option switched on (and IAM authorization in a second, smaller assertion), cdk-nag included."""
    outdir = tmp_path_factory.mktemp("cdk.options")
    app, stack = build_app(context=OPTIONS, outdir=str(outdir))
    assembly = app.synth()  # raises on any unacknowledged cdk-nag finding
    template = assembly.get_stack_by_name(stack.stack_name).template
    report = json.loads((outdir / "validation-report.json").read_text())
    assert report["pluginReports"] == []
    return {"template": template, "resources": template["Resources"], "app": app}


def _training_parameters(resources) -> dict:
    [machine] = [m for k, m in of_type(resources, "AWS::StepFunctions::StateMachine").items() if "Training" in k]
    return json.loads(flatten(machine["Properties"]["DefinitionString"]))["States"]["TrainModel"]["Parameters"]


def test_training_job_options(options, resources):
    p = _training_parameters(options["resources"])
    assert p["EnableNetworkIsolation"] is False
    assert p["EnableInterContainerTrafficEncryption"] is True
    assert p["VpcConfig"] == {"Subnets": ["subnet-0a1b", "subnet-0c2d"], "SecurityGroupIds": ["sg-0e3f"]}
    assert p["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge" and "VolumeKmsKeyId" in p["ResourceConfig"]
    actions = {a for lid, s in policy_statements(options["resources"]) if lid.startswith("TrainingSageMakerExecutionRole")
               for a in as_list(s["Action"])}
    assert {"ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface", "kms:CreateGrant"} <= actions
    default_actions = {a for lid, s in policy_statements(resources) if lid.startswith("TrainingSageMakerExecutionRole")
                       for a in as_list(s["Action"])}
    assert not {a for a in default_actions if a.startswith("ec2:")} and "kms:CreateGrant" not in default_actions


def test_daily_cap_on_by_default_and_off(options, resources):
    def starter(res):
        [(lid, fn)] = [(k, v) for k, v in of_type(res, "AWS::Lambda::Function").items()
                       if k.startswith("TrainingStarterFunction")]
        actions = {a for pid, s in policy_statements(res) if pid.startswith("TrainingStarterFunctionRole")
                   for a in as_list(s["Action"])}
        return fn["Properties"]["Environment"]["Variables"], actions

    env, actions = starter(resources)
    assert env["MAX_RUNS_PER_DAY"] == str(load().max_training_runs_per_day) != "0"
    assert {"states:ListExecutions", "sns:Publish", "s3:PutObject", "states:StartExecution"} <= actions
    env, actions = starter(options["resources"])
    assert env["MAX_RUNS_PER_DAY"] == "0"
    assert actions & {"states:ListExecutions", "sns:Publish", "s3:PutObject"} == set()


def test_api_options(options, resources):
    res = options["resources"]
    [post] = [m["Properties"] for m in of_type(res, "AWS::ApiGateway::Method").values()
              if m["Properties"]["HttpMethod"] == "POST"]
    assert post["ApiKeyRequired"] is True and post["AuthorizationType"] == "COGNITO_USER_POOLS"
    [authorizer] = of_type(res, "AWS::ApiGateway::Authorizer").values()
    assert authorizer["Properties"]["ProviderARNs"] == [POOL]
    assert authorizer["Properties"]["IdentitySource"] == "method.request.header.Authorization"
    [acl] = of_type(res, "AWS::WAFv2::WebACL").values()
    [rule] = acl["Properties"]["Rules"]
    assert rule["Statement"]["RateBasedStatement"]["Limit"] == 300 and rule["Action"] == {"Block": {}}
    assert len(of_type(res, "AWS::WAFv2::WebACLAssociation")) == 1
    [waf_logs] = of_type(res, "AWS::WAFv2::LoggingConfiguration").values()
    assert {f["SingleHeader"]["Name"] for f in waf_logs["Properties"]["RedactedFields"]} == {"x-api-key", "authorization"}
    # defaults: the key alone, no WAF, no authorizer
    [default_post] = [m["Properties"] for m in of_type(resources, "AWS::ApiGateway::Method").values()
                      if m["Properties"]["HttpMethod"] == "POST"]
    assert default_post["AuthorizationType"] == "NONE" and default_post["ApiKeyRequired"] is True
    assert not of_type(resources, "AWS::WAFv2::WebACL") and not of_type(resources, "AWS::ApiGateway::Authorizer")


def test_iam_authorization():
    app, stack = build_app(context={"apiAuthorization": "iam"})
    template = Template.from_stack(stack)
    template.has_resource_properties("AWS::ApiGateway::Method", {"HttpMethod": "POST", "AuthorizationType": "AWS_IAM",
                                                                 "ApiKeyRequired": True})


def test_concurrency_options(options, resources):
    res = options["resources"]
    [(_, fn)] = [(k, v) for k, v in of_type(res, "AWS::Lambda::Function").items() if k.startswith("ServingInference")]
    assert fn["Properties"]["ReservedConcurrentExecutions"] == 10
    [alias] = of_type(res, "AWS::Lambda::Alias").values()
    assert alias["Properties"]["Name"] == "live"
    assert alias["Properties"]["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": 2}
    [post] = [m["Properties"] for m in of_type(res, "AWS::ApiGateway::Method").values()
              if m["Properties"]["HttpMethod"] == "POST"]
    assert ":live" in json.dumps(post["Integration"]["Uri"]) or "Alias" in json.dumps(post["Integration"]["Uri"])
    [(_, default_fn)] = [(k, v) for k, v in of_type(resources, "AWS::Lambda::Function").items()
                         if k.startswith("ServingInference")]
    assert "ReservedConcurrentExecutions" not in default_fn["Properties"] and not of_type(resources, "AWS::Lambda::Alias")


def test_cors_origins_never_star_when_named(options, resources):
    res = options["resources"]
    [(_, fn)] = [(k, v) for k, v in of_type(res, "AWS::Lambda::Function").items() if k.startswith("ServingInference")]
    env = fn["Properties"]["Environment"]["Variables"]
    assert env["CORS_ALLOW_ORIGINS"] == "https://a.example,https://b.example"
    assert "'*'" not in json.dumps(res) and '"*"' not in json.dumps(
        [m["Properties"].get("Integration", {}) for m in of_type(res, "AWS::ApiGateway::Method").values()])
    for response in of_type(res, "AWS::ApiGateway::GatewayResponse").values():  # one fixed value: the first origin
        assert response["Properties"]["ResponseParameters"] == {
            "gatewayresponse.header.Access-Control-Allow-Origin": "'https://a.example'"}
    # the default is the open API (the key is the access control): "*" everywhere
    [(_, default_fn)] = [(k, v) for k, v in of_type(resources, "AWS::Lambda::Function").items()
                         if k.startswith("ServingInference")]
    assert default_fn["Properties"]["Environment"]["Variables"]["CORS_ALLOW_ORIGINS"] == "*"


def test_budget_and_drift_band_options(options, resources):
    res = options["resources"]
    [budget] = of_type(res, "AWS::Budgets::Budget").values()
    data = budget["Properties"]["Budget"]
    assert data["BudgetLimit"] == {"Amount": 50, "Unit": "USD"} and data["TimeUnit"] == "MONTHLY"
    assert data["CostFilters"] == {"TagKeyValue": ["user:project$cxr-pneumonia"]}
    kinds = {(n["Notification"]["NotificationType"], n["Notification"]["Threshold"])
             for n in budget["Properties"]["NotificationsWithSubscribers"]}
    assert kinds == {("ACTUAL", 80), ("FORECASTED", 100)}
    assert not of_type(resources, "AWS::Budgets::Budget")

    def drift(r):
        [alarm] = [a["Properties"] for k, a in of_type(r, "AWS::CloudWatch::Alarm").items() if "PredictionMixDrift" in k]
        [expression] = [m["Expression"] for m in alarm["Metrics"] if "Expression" in m]
        periods = {m["MetricStat"]["Period"] for m in alarm["Metrics"] if "MetricStat" in m}
        return expression, periods

    expression, periods = drift(res)
    assert ">= 50 AND" in expression and "< 0.3 OR" in expression and "> 0.8)" in expression and periods == {12 * 3600}
    band = load().prediction_mix()
    expression, periods = drift(resources)
    assert f"< {band['low']} OR" in expression and f"> {band['high']})" in expression
    assert periods == {band["window_hours"] * 3600}
