"""A container Lambda with its own role and its own encrypted, time-limited log group.

Each function gets a role that holds only what that function does (no shared role, no
AWSLambdaBasicExecutionRole, whose log permissions span every log group in the account).
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Size
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

# CloudWatch Logs accepts only these retention periods (days).
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)


def log_group(scope: Construct, id: str, *, key: kms.IKey, retention_days: int) -> logs.LogGroup:
    if retention_days not in RETENTION_DAYS:
        raise ValueError(f"logRetentionDays {retention_days} is not one CloudWatch Logs accepts: {RETENTION_DAYS}")
    group = logs.LogGroup(scope, id, encryption_key=key, removal_policy=RemovalPolicy.RETAIN)
    group.node.default_child.add_property_override("RetentionInDays", retention_days)
    return group


@dataclass
class ContainerFunction:
    function: lambda_.DockerImageFunction
    role: iam.Role
    log_group: logs.LogGroup


def container_function(scope: Construct, id: str, *, code: lambda_.DockerImageCode, key: kms.IKey,
                       retention_days: int, description: str, environment: dict[str, str] | None = None,
                       memory_size: int = 512, timeout: Duration | None = None,
                       ephemeral_storage_mb: int | None = None,
                       dead_letter_queue: sqs.IQueue | None = None) -> ContainerFunction:
    group = log_group(scope, f"{id}Logs", key=key, retention_days=retention_days)
    role = iam.Role(scope, f"{id}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                    description=f"{id}: {description}"[:1000])
    role.add_to_policy(iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                           resources=[group.log_group_arn]))
    fn = lambda_.DockerImageFunction(
        scope, id,
        code=code,
        description=description,
        architecture=lambda_.Architecture.X86_64,
        role=role,
        log_group=group,
        logging_format=lambda_.LoggingFormat.JSON,
        memory_size=memory_size,
        timeout=timeout or Duration.minutes(1),
        environment=environment or {},
        ephemeral_storage_size=Size.mebibytes(ephemeral_storage_mb) if ephemeral_storage_mb else None,
        dead_letter_queue=dead_letter_queue,
    )
    return ContainerFunction(fn, role, group)
