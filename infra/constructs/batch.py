"""Batch inference on a managed engine: a Step Functions Distributed Map over an S3 listing.

``BatchPredict`` takes ``{"input_prefix", "output_uri", "work_uri", "model_uri", "sha256"}``
(``python -m infra.batch_predict`` builds it). The map reads the listing of
``s3://<data bucket>/<input_prefix>`` itself, hands 100 keys at a time to the scoring function
(up to 40 at once), and tolerates no failed batch: a bad *file* is a row with its error code, so a
failed batch means the model or the service failed. The merge function then writes one CSV.
Progress (items processed, failed) shows in the Step Functions console's map run view and on the
command line.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from ..config import MODELS_PREFIX, Config
from ..functions.batch import BATCH_OUTPUT_PREFIX, ITEMS_PER_BATCH
from ..functions.common import Settings
from ..nag import acknowledge, acknowledge_wildcards
from ..packaging import stage_functions_context
from . import output
from .lambdas import container_function, log_group
from .storage import Storage

MAX_CONCURRENCY = 40
_ENV = Settings.env_names()


class BatchInference(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, storage: Storage) -> None:
        super().__init__(scope, id)
        data, artifacts, key = storage.data_bucket, storage.artifacts_bucket, storage.key
        code_dir = str(stage_functions_context())
        self.functions = {}
        for name, handler, memory, timeout, description in (
            ("Score", "infra.functions.batch.handler", 3008, 900, "batch inference: scores one batch of S3 keys"),
            ("Merge", "infra.functions.batch.merge_handler", 1024, 900, "batch inference: joins the parts into one CSV"),
        ):
            self.functions[name] = container_function(
                self, f"Batch{name}Function",
                code=lambda_.DockerImageCode.from_image_asset(code_dir, cmd=[handler],
                                                              platform=ecr_assets.Platform.LINUX_AMD64),
                key=key, retention_days=config.log_retention_days, description=description,
                memory_size=memory, timeout=Duration.seconds(timeout))
        score, merge = self.functions["Score"], self.functions["Merge"]
        for fn in (score, merge):
            fn.role.add_to_policy(iam.PolicyStatement(sid="UseDataKey", actions=["kms:Decrypt", "kms:GenerateDataKey"],
                                                      resources=[key.key_arn]))
            fn.role.add_to_policy(iam.PolicyStatement(sid="WriteResults", actions=["s3:PutObject"],
                                                      resources=[data.arn_for_objects(f"{BATCH_OUTPUT_PREFIX}*")]))
        score.role.add_to_policy(iam.PolicyStatement(sid="ReadImages", actions=["s3:GetObject"],
                                                     resources=[data.arn_for_objects("*")]))
        score.role.add_to_policy(iam.PolicyStatement(sid="ReadModels", actions=["s3:GetObject"],
                                                     resources=[artifacts.arn_for_objects(f"{MODELS_PREFIX}*")]))
        merge.role.add_to_policy(iam.PolicyStatement(sid="ReadAndRemoveParts", actions=["s3:GetObject", "s3:DeleteObject"],
                                                     resources=[data.arn_for_objects(f"{BATCH_OUTPUT_PREFIX}*")]))
        merge.role.add_to_policy(iam.PolicyStatement(sid="ListParts", actions=["s3:ListBucket"], resources=[data.bucket_arn],
                                                     conditions={"StringLike": {"s3:prefix": [f"{BATCH_OUTPUT_PREFIX}*"]}}))

        scoring = tasks.LambdaInvoke(self, "ScoreBatch", lambda_function=score.function, payload_response_only=True,
                                     retry_on_service_exceptions=True)
        fan_out = sfn.DistributedMap(
            self, "ScoreEveryImage",
            comment="one item per S3 object under the input prefix, in batches",
            item_reader=sfn.S3ObjectsItemReader(bucket=data, prefix=sfn.JsonPath.string_at("$.input_prefix")),
            # ItemBatcher renders batch_input as written (JsonPath tokens are not given the ".$" suffix
            # there), so the path keys carry it themselves: without it every batch got "$.model_uri".
            item_batcher=sfn.ItemBatcher(max_items_per_batch=ITEMS_PER_BATCH, batch_input={
                "bucket": data.bucket_name,
                "model_uri.$": "$.model_uri",
                "sha256.$": "$.sha256",
                "work_uri.$": "$.work_uri",
            }),
            max_concurrency=MAX_CONCURRENCY,
            tolerated_failure_percentage=0,
            result_path=sfn.JsonPath.DISCARD,
        )
        fan_out.item_processor(scoring)
        merging = tasks.LambdaInvoke(self, "MergeParts", lambda_function=merge.function, payload_response_only=True,
                                     result_path="$.result", retry_on_service_exceptions=True)
        self.log_group = log_group(self, "BatchStateMachineLogs", key=key, retention_days=config.log_retention_days)
        self.state_machine = sfn.StateMachine(
            self, "StateMachine",
            comment="Batch inference: every image under a data-bucket prefix, one CSV row each",
            definition_body=sfn.DefinitionBody.from_chainable(fan_out.next(merging)),
            timeout=Duration.hours(24), tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=False),
        )
        # The map lists the prefix itself.
        self.state_machine.add_to_role_policy(iam.PolicyStatement(sid="ListImages", actions=["s3:ListBucket"],
                                                                  resources=[data.bucket_arn]))
        output(self, "BatchStateMachineArn", self.state_machine.state_machine_arn,
               "python -m infra.batch_predict starts it")
        self._suppressions()

    def _suppressions(self) -> None:
        for fn in self.functions.values():
            acknowledge_wildcards(fn.role, [r"^Resource::.*/(batch|models)/\*$", r"^Resource::.*\.Arn>/\*$"],
                                  "Batch inference reads the images under any prefix of the product's own data bucket "
                                  "that the user names, writes results under its batch/ prefix and reads models/.")
            acknowledge(fn.function, [
                ("HIPAA.Security-LambdaInsideVPC", "Batch scoring reaches only S3 through IAM over TLS and serves no "
                 "network clients."),
                ("HIPAA.Security-LambdaConcurrency", "The map's MaxConcurrency bounds the scoring function's concurrency."),
                ("HIPAA.Security-LambdaDLQ", "Step Functions invokes these functions synchronously and fails the batch "
                 "on an error."),
            ])
        acknowledge_wildcards(self.state_machine, [r"^Resource::.*$", r"^Action::s3:.*$"],
                              "The Distributed Map lists and reads the product's own data bucket, starts child "
                              "executions of this state machine and invokes the function's versions.")
