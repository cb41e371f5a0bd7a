"""Dataset marker -> validate -> SageMaker training -> evaluate -> gate -> register -> promote -> notify.

The state machine is generated from :data:`infra.pipeline.PIPELINE`, the list the local twin runs
too. The training step is a ``createTrainingJob.sync`` task written as a CustomState because the
CDK task construct lacks checkpoints, managed spot with MaxWaitTimeInSeconds, SageMaker metrics
time series and channels chosen at run time.
"""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import ArnFormat, Aws, Duration, Stack
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from ..config import (
    CHECKPOINT_LOCAL_PATH,
    CHECKPOINTS_PREFIX,
    DATASETS_PREFIX,
    METRIC_DEFINITIONS,
    MODELS_PREFIX,
    REFUSED_RUNS_PREFIX,
    Config,
    ecr_repository_arn,
)
from ..functions.common import RUN_ID_PREFIX, Settings
from ..nag import acknowledge, acknowledge_wildcards
from ..names import dataset_ready_pattern
from ..packaging import stage_functions_context, stage_training_context
from ..pipeline import PIPELINE, STARTER, TRAINING_RESULT_FIELDS, Pipeline, Step
from . import output
from .lambdas import ContainerFunction, container_function, log_group
from .registry import ModelRegistry
from .storage import Storage

SAGEMAKER_EVENTS_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
_ENV = Settings.env_names()

# CreateTrainingJob refused for lack of capacity or quota (ResourceLimitExceeded: too many instances
# of the type or jobs at once; SageMaker's API errors reach Step Functions as
# AmazonSageMakerException). No job was created, so the same job name is tried again, with
# exponential backoff and full jitter: 1, 2, 4, 8 minutes (capped at 15), then the run fails with the
# reason. Capacity for a spot job that has started is SageMaker's own wait (maxWaitSeconds).
TRAINING_CAPACITY_RETRY = {
    "ErrorEquals": ["SageMaker.ResourceLimitExceededException", "SageMaker.AmazonSageMakerException"],
    "IntervalSeconds": 60, "BackoffRate": 2.0, "MaxAttempts": 4, "MaxDelaySeconds": 900, "JitterStrategy": "FULL",
}


class TrainingPipeline(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, storage: Storage, registry: ModelRegistry,
                 topic: sns.ITopic, pipeline: Pipeline = PIPELINE) -> None:
        super().__init__(scope, id)
        self.config = config
        self.storage = storage
        self.registry = registry
        self.topic = topic
        stack = Stack.of(self)

        self.image_uri, repository_arn = self._training_image()
        self.sagemaker_role = self._sagemaker_role(stack, repository_arn)

        self.dead_letters = sqs.Queue(
            self, "StarterDeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )
        code_dir = str(stage_functions_context())
        self.functions: dict[str, ContainerFunction] = {}
        for module, spec in {"starter": STARTER, **pipeline.functions()}.items():
            name = "".join(part.title() for part in module.split("_")) + "Function"
            self.functions[module] = container_function(
                self, name,
                code=lambda_.DockerImageCode.from_image_asset(
                    code_dir, cmd=[f"infra.functions.{module}.handler"], platform=ecr_assets.Platform.LINUX_AMD64),
                key=storage.key, retention_days=config.log_retention_days, description=spec.description,
                memory_size=spec.memory_mb, timeout=Duration.seconds(spec.timeout_s),
                ephemeral_storage_mb=spec.ephemeral_mb,
                # Only the starter is invoked asynchronously (by EventBridge); the others answer
                # Step Functions directly, which catches their failures.
                dead_letter_queue=self.dead_letters if module == "starter" else None,
            )
        self._grant_functions()

        self.log_group = log_group(self, "StateMachineLogs", key=storage.key, retention_days=config.log_retention_days)
        runtime = config.max_wait_seconds if config.use_spot_instances else config.max_runtime_seconds
        self.state_machine = sfn.StateMachine(
            self, "StateMachine",
            comment="Train, gate, register and promote a chest X-ray classifier for one dataset upload",
            definition_body=sfn.DefinitionBody.from_chainable(self._definition(pipeline)),
            timeout=Duration.seconds(runtime + 3600),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
        )
        self._grant_state_machine(stack)
        self._trigger()
        self._suppressions()

        output(self, "StateMachineArn", self.state_machine.state_machine_arn)
        output(self, "TrainingImage", self.image_uri)
        output(self, "SageMakerRoleArn", self.sagemaker_role.role_arn, "the role `python -m infra.launch` passes to jobs")
        output(self, "PromotedModelParameter", registry.pointer.parameter_name)
        output(self, "ModelPackageGroup", registry.group_name)

    # ------------------------------------------------------------------ training image and role

    def _training_image(self) -> tuple[str, str]:
        """The image every job runs: ``trainingImageUri`` when set, else ``training_job/Dockerfile``
        built and pushed by ``cdk deploy`` (the runtime CI tests; README, "The training image")."""
        if self.config.training_image_uri:
            return self.config.training_image_uri, ecr_repository_arn(self.config.training_image_uri)
        self.image = ecr_assets.DockerImageAsset(
            self, "TrainingImageAsset", directory=str(stage_training_context()), platform=ecr_assets.Platform.LINUX_AMD64)
        return self.image.image_uri, self.image.repository.repository_arn

    def _sagemaker_role(self, stack: Stack, repository_arn: str) -> iam.Role:
        data, artifacts, key = self.storage.data_bucket, self.storage.artifacts_bucket, self.storage.key
        role = iam.Role(self, "SageMakerExecutionRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                        description="Training jobs: read datasets/, write models/ and checkpoints/")
        statements = [
            iam.PolicyStatement(sid="ListDatasets", actions=["s3:ListBucket"], resources=[data.bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [f"{DATASETS_PREFIX}*"]}}),
            iam.PolicyStatement(sid="ReadDatasets", actions=["s3:GetObject"],
                                resources=[data.arn_for_objects(f"{DATASETS_PREFIX}*")]),
            iam.PolicyStatement(sid="WriteModelsAndCheckpoints", actions=["s3:PutObject"],
                                resources=[artifacts.arn_for_objects(f"{MODELS_PREFIX}*"),
                                           artifacts.arn_for_objects(f"{CHECKPOINTS_PREFIX}*")]),
            # A job restarted after a spot interruption downloads its checkpoints again.
            iam.PolicyStatement(sid="ResumeFromCheckpoints", actions=["s3:GetObject"],
                                resources=[artifacts.arn_for_objects(f"{CHECKPOINTS_PREFIX}*")]),
            iam.PolicyStatement(sid="ListCheckpoints", actions=["s3:ListBucket"], resources=[artifacts.bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [f"{CHECKPOINTS_PREFIX}*"]}}),
            # Encrypt: SageMaker encrypts the model archive with OutputDataConfig.KmsKeyId as this role.
            iam.PolicyStatement(sid="UseDataKey", actions=["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                                resources=[key.key_arn]),
            *([iam.PolicyStatement(sid="EncryptTrainingVolume", actions=["kms:CreateGrant", "kms:DescribeKey"],
                                   resources=[key.key_arn],
                                   conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}})]
              if self.config.training_volume_kms() else []),
            iam.PolicyStatement(sid="TrainingLogs",
                                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                                         "logs:DescribeLogStreams"],
                                resources=[stack.format_arn(service="logs", resource="log-group",
                                                            resource_name=f"{TRAINING_LOG_GROUP}:*",
                                                            arn_format=ArnFormat.COLON_RESOURCE_NAME)]),
            iam.PolicyStatement(sid="TrainingMetrics", actions=["cloudwatch:PutMetricData"], resources=["*"],
                                conditions={"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}),
            iam.PolicyStatement(sid="PullTrainingImageToken", actions=["ecr:GetAuthorizationToken"], resources=["*"]),
            iam.PolicyStatement(sid="PullTrainingImage",
                                actions=["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
                                resources=[repository_arn]),
        ]
        if self.config.training_vpc_subnet_ids:
            # What SageMaker does as this role to put a job's network interfaces into the VPC
            # (SageMaker developer guide, "Give SageMaker Training Jobs Access to Resources in Your VPC").
            statements.append(iam.PolicyStatement(
                sid="TrainInVpc", resources=["*"],
                actions=["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                         "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"]))
        for statement in statements:
            role.add_to_policy(statement)
        return role

    # ------------------------------------------------------------------ functions

    def _grant_functions(self) -> None:
        data, artifacts, key = self.storage.data_bucket, self.storage.artifacts_bucket, self.storage.key
        pointer = self.registry.pointer
        f = self.functions

        def env(module: str, **values: str) -> None:
            for name, value in values.items():
                f[module].function.add_environment(_ENV[name], value)

        def allow(module: str, sid: str, actions: list[str], resources: list[str], **extra: Any) -> None:
            f[module].role.add_to_policy(iam.PolicyStatement(sid=sid, actions=actions, resources=resources, **extra))

        env("starter", artifacts_bucket=artifacts.bucket_name, topic_arn=self.topic.topic_arn,
            max_runs_per_day=str(self.config.max_training_runs_per_day))
        if self.config.max_training_runs_per_day:
            allow("starter", "RecordRefusedRuns", ["s3:PutObject"], [artifacts.arn_for_objects(f"{REFUSED_RUNS_PREFIX}*")])
            allow("starter", "AnnounceRefusedRuns", ["sns:Publish"], [self.topic.topic_arn])
            allow("starter", "UseDataKey", ["kms:Decrypt", "kms:GenerateDataKey"], [key.key_arn])

        env("validate_dataset", data_bucket=data.bucket_name)
        allow("validate_dataset", "ReadMarkersAndDatasets", ["s3:GetObject", "s3:GetObjectVersion"],
              [data.arn_for_objects(f"{DATASETS_PREFIX}*")])
        allow("validate_dataset", "ListDatasets", ["s3:ListBucket"], [data.bucket_arn],
              conditions={"StringLike": {"s3:prefix": [f"{DATASETS_PREFIX}*"]}})
        allow("validate_dataset", "DecryptDatasets", ["kms:Decrypt"], [key.key_arn])

        gate_settings = json.dumps(self.config.gate_settings(), sort_keys=True)
        env("evaluate", artifacts_bucket=artifacts.bucket_name, pointer_parameter=pointer.parameter_name,
            gate=gate_settings, evaluation_dataset=self.config.evaluation_dataset_uri)
        allow("evaluate", "ReadModels", ["s3:GetObject"], [artifacts.arn_for_objects(f"{MODELS_PREFIX}*")])
        allow("evaluate", "WriteEvaluation", ["s3:PutObject"],
              [artifacts.arn_for_objects(f"{MODELS_PREFIX}*/evaluation/*")])
        allow("evaluate", "ReadEvaluationSets", ["s3:GetObject"], [data.arn_for_objects(f"{DATASETS_PREFIX}*")])
        allow("evaluate", "ListEvaluationSets", ["s3:ListBucket"], [data.bucket_arn],
              conditions={"StringLike": {"s3:prefix": [f"{DATASETS_PREFIX}*"]}})
        if self.config.evaluation_dataset_uri:
            fixed_bucket, _, fixed_prefix = self.config.evaluation_dataset_uri[5:].partition("/")
            allow("evaluate", "ReadFixedEvaluationSet", ["s3:GetObject"],
                  [f"arn:{Aws.PARTITION}:s3:::{fixed_bucket}/{fixed_prefix}*"])
            allow("evaluate", "ListFixedEvaluationSet", ["s3:ListBucket"], [f"arn:{Aws.PARTITION}:s3:::{fixed_bucket}"],
                  conditions={"StringLike": {"s3:prefix": [f"{fixed_prefix}*"]}})
        allow("evaluate", "UseDataKey", ["kms:Decrypt", "kms:GenerateDataKey"], [key.key_arn])
        allow("evaluate", "ReadPointer", ["ssm:GetParameter"], [pointer.parameter_arn])

        env("gate", artifacts_bucket=artifacts.bucket_name, gate=gate_settings)
        allow("gate", "WriteModelQuality", ["s3:PutObject"],
              [artifacts.arn_for_objects(f"{MODELS_PREFIX}*/model-quality.json")])
        allow("gate", "UseDataKey", ["kms:Decrypt", "kms:GenerateDataKey"], [key.key_arn])

        env("register", model_package_group=self.registry.group_name, artifacts_bucket=artifacts.bucket_name)
        allow("register", "RegisterModelPackages", ["sagemaker:CreateModelPackage"],
              [self.registry.package_arn_pattern, self.registry.group_arn])
        allow("register", "TagRejectedModels", ["s3:PutObjectTagging"], [artifacts.arn_for_objects(f"{MODELS_PREFIX}*")])

        env("promote", pointer_parameter=pointer.parameter_name)
        allow("promote", "MovePointer", ["ssm:GetParameter", "ssm:PutParameter"], [pointer.parameter_arn])

        env("notify", topic_arn=self.topic.topic_arn, pointer_parameter=pointer.parameter_name)
        allow("notify", "Publish", ["sns:Publish"], [self.topic.topic_arn])
        allow("notify", "EncryptMessages", ["kms:Decrypt", "kms:GenerateDataKey"], [key.key_arn])
        allow("notify", "ReadPointer", ["ssm:GetParameter"], [pointer.parameter_arn])

    # ------------------------------------------------------------------ state machine

    def _lambda_state(self, step: Step, on_failure: sfn.IChainable | None) -> tasks.LambdaInvoke:
        state = tasks.LambdaInvoke(
            self, step.name,
            lambda_function=self.functions[step.function].function,
            comment=step.description or None,
            payload_response_only=True,
            result_path=f"$.{step.result_key}",
            retry_on_service_exceptions=True,
        )
        if on_failure is not None:
            state.add_catch(on_failure, errors=["States.ALL"], result_path="$.error")
        return state

    def set_serving_image(self, image_uri: str) -> None:
        """The inference image the registry's model packages name (known once serving is built)."""
        self.functions["register"].function.add_environment(_ENV["serving_image_uri"], image_uri)

    def training_parameters(self) -> dict[str, Any]:
        cfg, artifacts = self.config, self.storage.artifacts_bucket
        stopping = {"MaxRuntimeInSeconds": cfg.max_runtime_seconds}
        if cfg.use_spot_instances:
            stopping["MaxWaitTimeInSeconds"] = cfg.max_wait_seconds
        resources: dict[str, Any] = {"InstanceType": cfg.training_instance_type,
                                     "InstanceCount": cfg.training_instance_count,
                                     "VolumeSizeInGB": cfg.training_volume_size_gb}
        if cfg.training_volume_kms():
            # Instance types with NVMe instance storage (ml.g4dn, ml.g5, ...) are encrypted in
            # hardware, and SageMaker refuses a KMS key for them (Config.training_volume_kms).
            resources["VolumeKmsKeyId"] = self.storage.key.key_arn
        parameters = {
            "TrainingJobName.$": "$.run.job_name",
            "RoleArn": self.sagemaker_role.role_arn,
            "AlgorithmSpecification": {
                "TrainingImage": self.image_uri,
                "TrainingInputMode": "File",
                "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS],
                "EnableSageMakerMetricsTimeSeries": True,
            },
            # JSON-encoded values, as the SageMaker SDK sends them and the image's entrypoint decodes them.
            "HyperParameters": cfg.training_hyperparameters(),
            "InputDataConfig.$": "$.dataset.channels",
            "OutputDataConfig": {"S3OutputPath": f"s3://{artifacts.bucket_name}/{MODELS_PREFIX}",
                                 "KmsKeyId": self.storage.key.key_arn},
            "CheckpointConfig": {"S3Uri.$": "$.run.checkpoint_uri", "LocalPath": CHECKPOINT_LOCAL_PATH},
            "ResourceConfig": resources,
            "EnableManagedSpotTraining": cfg.use_spot_instances,
            # Nothing in the container may reach a network; SageMaker itself moves data and model.
            "EnableNetworkIsolation": cfg.training_network_isolation,
            # DDP traffic between instances is encrypted once there is more than one.
            "EnableInterContainerTrafficEncryption": cfg.training_instance_count > 1,
            "StoppingCondition": stopping,
            "Environment": {"PYTHONUNBUFFERED": "1"},
            "Tags": [
                {"Key": "cxr:dataset", "Value.$": "$.run.dataset_tag"},
                {"Key": "cxr:run-id", "Value.$": "$.run.run_id"},
                {"Key": "cxr:dataset-fingerprint", "Value.$": "$.dataset.fingerprint"},
            ],
        }
        if cfg.training_vpc_subnet_ids:
            parameters["VpcConfig"] = {"Subnets": list(cfg.training_vpc_subnet_ids),
                                       "SecurityGroupIds": list(cfg.training_vpc_security_group_ids)}
        return parameters

    def _training_state(self, step: Step, on_failure: sfn.IChainable) -> sfn.CustomState:
        state = sfn.CustomState(self, step.name, state_json={
            "Type": "Task",
            "Comment": step.description,
            "Resource": f"arn:{Aws.PARTITION}:states:::sagemaker:createTrainingJob.sync",
            "Parameters": self.training_parameters(),
            "ResultSelector": {f"{k}.$": v for k, v in TRAINING_RESULT_FIELDS.items()},
            "ResultPath": f"$.{step.result_key}",
            "Retry": [TRAINING_CAPACITY_RETRY],
        })
        state.add_catch(on_failure, errors=["States.ALL"], result_path="$.error")
        return state

    def _definition(self, pipeline: Pipeline) -> sfn.IChainable:
        failure = self._lambda_state(pipeline.on_failure, None)
        failure.next(sfn.Fail(self, "RunFailed", error="TrainingRunFailed",
                              cause="A step failed; the notification carries the reason. The model in service is unchanged."))

        def chain_from(i: int) -> sfn.IChainable:
            if i == len(pipeline.steps):
                return sfn.Succeed(self, "RunSucceeded")
            step = pipeline.steps[i]
            if step.kind == "choice":
                other = self._lambda_state(pipeline.branches[step.otherwise], failure)
                other.next(sfn.Succeed(self, "RunEndedWithoutPromotion"))
                return (sfn.Choice(self, step.name)
                        .when(sfn.Condition.boolean_equals(step.json_path, True), chain_from(i + 1))
                        .otherwise(other))
            state = (self._training_state(step, failure) if step.kind == "training"
                     else self._lambda_state(step, failure))
            state.next(chain_from(i + 1))
            return state

        return chain_from(0)

    def _grant_state_machine(self, stack: Stack) -> None:
        training_jobs = stack.format_arn(service="sagemaker", resource="training-job", resource_name=f"{RUN_ID_PREFIX}*")
        for statement in (
            iam.PolicyStatement(sid="RunTrainingJobs",
                                actions=["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob",
                                         "sagemaker:StopTrainingJob", "sagemaker:AddTags", "sagemaker:ListTags"],
                                resources=[training_jobs]),
            iam.PolicyStatement(sid="PassSageMakerRole", actions=["iam:PassRole"], resources=[self.sagemaker_role.role_arn],
                                conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}),
            # The .sync integration waits for the job through this Step Functions-managed rule.
            iam.PolicyStatement(sid="WatchTrainingJobs", actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                                resources=[stack.format_arn(service="events", resource="rule",
                                                            resource_name=SAGEMAKER_EVENTS_RULE)]),
        ):
            self.state_machine.add_to_role_policy(statement)

    # ------------------------------------------------------------------ trigger

    def _trigger(self) -> None:
        starter = self.functions["starter"]
        starter.function.add_environment(_ENV["state_machine_arn"], self.state_machine.state_machine_arn)
        starter.role.add_to_policy(iam.PolicyStatement(sid="StartRuns", actions=["states:StartExecution"],
                                                       resources=[self.state_machine.state_machine_arn]))
        if self.config.max_training_runs_per_day:
            # The daily cap counts today's executions.
            starter.role.add_to_policy(iam.PolicyStatement(sid="CountRuns", actions=["states:ListExecutions"],
                                                           resources=[self.state_machine.state_machine_arn]))
        # The local twin applies the same pattern (infra.twin.trigger).
        pattern = dataset_ready_pattern(self.storage.data_bucket.bucket_name)
        self.rule = events.Rule(
            self, "DatasetReady",
            description="A datasets/<name>/_READY marker was written: train on that dataset",
            event_pattern=events.EventPattern(
                source=pattern["source"], detail_type=pattern["detail-type"], detail=pattern["detail"]),
            targets=[targets.LambdaFunction(starter.function, dead_letter_queue=self.dead_letters,
                                            retry_attempts=8, max_event_age=Duration.hours(6))],
        )

    # ------------------------------------------------------------------ cdk-nag

    def _suppressions(self) -> None:
        acknowledge_wildcards(self.sagemaker_role, [
            r"^Resource::.*/(datasets|models|checkpoints|code)/\*$",
            r"^Resource::arn:(<AWS::Partition>|aws[a-z-]*):logs:.*/aws/sagemaker/TrainingJobs:\*$",
            r"^Resource::\*$",
            r"^Resource::arn:(<AWS::Partition>|aws[a-z-]*):ecr:.*:repository/.*$",
        ], "Training reads every object under datasets/ (and its code under code/) and writes under models/ and "
           "checkpoints/ of the product's own buckets (object names are chosen per run); its log group is SageMaker's fixed "
           "/aws/sagemaker/TrainingJobs; ecr:GetAuthorizationToken and cloudwatch:PutMetricData have no resource-level "
           "permissions (the latter is limited to SageMaker namespaces by condition); the Deep Learning Container "
           "registry account differs between regions.")
        for fn in self.functions.values():
            acknowledge_wildcards(fn.role, [
                r"^Resource::.*/(datasets|models|runs/refused)/\*(/model-quality\.json|/evaluation/\*)?$",
                r"^Resource::arn:<AWS::Partition>:s3:::.*\*$",
                r"^Resource::arn:(<AWS::Partition>|aws[a-z-]*):sagemaker:.*:model-package/.+/\*$",
            ], "Object keys carry the dataset and training-job names chosen per run, so access is granted to the "
               "datasets/ or models/ prefix of the product's own bucket (refusal records under runs/refused/ are named "
               "by run id likewise); model package ARNs are created by SageMaker "
               "inside the product's single model package group.")
            acknowledge(fn.function, [
                ("HIPAA.Security-LambdaInsideVPC", "The pipeline functions reach only S3, SSM, SageMaker, SNS and Step "
                 "Functions APIs through IAM over TLS and serve no network clients; a VPC would add NAT or interface "
                 "endpoints without isolating any private resource."),
                ("HIPAA.Security-LambdaConcurrency", "Runs start once per dataset upload and each run invokes a step "
                 "once; reserving concurrency would take capacity from the account without bounding anything that "
                 "can grow."),
                ("HIPAA.Security-LambdaDLQ", "Step Functions invokes these steps synchronously and catches every "
                 "failure into the failure notification; the asynchronously invoked starter has an SQS dead-letter "
                 "queue."),
            ])
        acknowledge(self.dead_letters, [
            ("AwsSolutions-SQS3", "This queue is itself the dead-letter queue of the starter function and of its "
             "EventBridge target."),
        ])
        acknowledge_wildcards(self.state_machine, [
            r"^Resource::arn:(<AWS::Partition>|aws[a-z-]*):sagemaker:.*:training-job/cxr-\*$",
            r"^Resource::<.*Function.*\.Arn>:\*$",
            r"^Resource::\*$",
        ], "Training job ARNs carry the run id chosen per dataset upload (all start with cxr-); Lambda invocations "
           "allow the function's versions; X-Ray and CloudWatch Logs delivery APIs have no resource-level permissions.")
