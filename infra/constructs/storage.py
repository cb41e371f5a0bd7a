"""Buckets and the key that encrypts the product's data at rest.

- data: uploaded datasets (``datasets/<name>/...`` and the ``_READY`` marker, contract 1).
  EventBridge notifications are on so the marker can start a run.
- artifacts: what training produces (``models/<job>/output/model.tar.gz``) and its checkpoints
  (``checkpoints/<job>/``).
- access logs: S3 server access logs of the other two.

Chest X-rays are health data: the data and artifacts buckets use a customer-managed KMS key
(rotated yearly), refuse plain HTTP, keep versions, and log every access.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ..config import CHECKPOINTS_PREFIX, MODELS_PREFIX, Config
from ..functions.common import APPROVAL_TAG
from ..nag import acknowledge
from . import output


class Storage(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)

        self.key = kms.Key(
            self, "DataKey",
            description=f"{config.stack_name}: chest X-ray datasets, models, logs and notifications",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        # CloudWatch Logs encrypts the product's log groups with this key.
        self.key.add_to_resource_policy(iam.PolicyStatement(
            sid="AllowCloudWatchLogs",
            principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
            actions=["kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo",
                     "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"],
            resources=["*"],
            conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                    f"arn:{stack.partition}:logs:{stack.region}:{stack.account}:log-group:*"}},
        ))
        # CloudWatch alarms publish to the encrypted notification topic.
        self.key.add_to_resource_policy(iam.PolicyStatement(
            sid="AllowCloudWatchAlarmsToPublish",
            principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=["kms:Decrypt", "kms:GenerateDataKey"],
            resources=["*"],
            conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
        ))

        self.log_bucket = s3.Bucket(
            self, "AccessLogs",
            # S3 server access logging can deliver only to buckets with S3-managed encryption.
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            enforce_ssl=True,
            versioned=True,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(id="ExpireAccessLogs", expiration=Duration.days(config.access_log_expiration_days),
                                 noncurrent_version_expiration=Duration.days(1)),
            ],
        )
        acknowledge(self.log_bucket, [
            ("AwsSolutions-S1", "This bucket receives the server access logs of the dataset and artifact buckets; "
             "logging it into itself would log every log delivery in a loop."),
            ("HIPAA.Security-S3BucketLoggingEnabled", "This bucket is the access-log destination of the dataset and "
             "artifact buckets; logging it into itself would loop."),
            ("HIPAA.Security-S3DefaultEncryptionKMS", "S3 server access log delivery supports only SSE-S3 on the "
             "destination bucket; the logs hold request metadata, never X-ray images."),
            ("HIPAA.Security-S3BucketReplicationEnabled", "Access logs are kept in the deployment region for audit; "
             "cross-region copies are left to the account's own backup policy."),
        ])

        common = dict(
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,  # one data key per bucket, not one KMS call per object
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=self.log_bucket,
            removal_policy=RemovalPolicy.RETAIN,
        )
        abort_uploads = s3.LifecycleRule(id="AbortIncompleteUploads", abort_incomplete_multipart_upload_after=Duration.days(7))
        noncurrent = s3.LifecycleRule(id="ExpireNoncurrentVersions",
                                      noncurrent_version_expiration=Duration.days(config.noncurrent_version_expiration_days))

        self.data_bucket = s3.Bucket(
            self, "Data", server_access_logs_prefix="data-bucket/", lifecycle_rules=[abort_uploads, noncurrent], **common)
        # EventBridge delivery set on the bucket itself: CDK's event_bridge_enabled would add a
        # custom-resource Lambda to configure what CloudFormation can state directly.
        self.data_bucket.node.default_child.add_property_override(
            "NotificationConfiguration.EventBridgeConfiguration.EventBridgeEnabled", True)

        self.artifacts_bucket = s3.Bucket(
            self, "Artifacts", server_access_logs_prefix="artifacts-bucket/",
            lifecycle_rules=[
                abort_uploads, noncurrent,
                s3.LifecycleRule(id="ExpireCheckpoints", prefix=CHECKPOINTS_PREFIX,
                                 expiration=Duration.days(config.checkpoint_expiration_days)),
                s3.LifecycleRule(id="ExpireRejectedModels", prefix=MODELS_PREFIX,
                                 tag_filters={APPROVAL_TAG: "Rejected"},
                                 expiration=Duration.days(config.rejected_model_expiration_days)),
            ],
            **common,
        )
        output(self, "DataBucketName", self.data_bucket.bucket_name, "upload datasets under datasets/<name>/")
        output(self, "ArtifactsBucketName", self.artifacts_bucket.bucket_name)
        output(self, "DataKeyArn", self.key.key_arn)
        for bucket in (self.data_bucket, self.artifacts_bucket):
            acknowledge(bucket, [
                ("HIPAA.Security-S3BucketReplicationEnabled", "Datasets can be re-uploaded and models retrained from "
                 "them; versioning protects against overwrites, and cross-region replication of health data is a "
                 "residency decision left to the deploying organisation."),
            ])
