"""The HTTPS API: API Gateway (REST) in front of the container Lambda that runs the model.

Routes (contract 5):

- ``POST /predict``: needs an API key (header ``x-api-key``); the usage plan throttles and caps
  each key. Raw image bodies are passed to the function base64-encoded (binary media types).
- ``GET /`` (the upload page) and ``GET /health`` (names the model in service) are open: a
  browser must load the page before it has a key to send, and monitoring probes the health
  route. Neither returns anything but the page and the model's version.

The function image is built from ``inference_lambda/Dockerfile`` with the repository root as its
build context (the image needs ``shared/`` too). It reads the promoted-model pointer from SSM at
cold start (``MODEL_URI=ssm:<parameter>``) and may read only ``models/`` of the artifacts bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from ..config import MODELS_PREFIX, ROOT, Config
from ..nag import acknowledge, acknowledge_wildcards
from ..names import BINARY_MEDIA_TYPES
from . import output
from .lambdas import container_function, log_group
from .registry import ModelRegistry
from .storage import Storage

INFERENCE_DOCKERFILE = "inference_lambda/Dockerfile"
# The build context is the repository root; only what the serving image needs is sent
# (Docker ignore syntax, applied after the repository's own .dockerignore).
INFERENCE_CONTEXT_EXCLUDE = [
    "*",
    "!shared/",
    "!inference_lambda/",
    "**/__pycache__",
    "**/*.pyc",
    "**/.pytest_cache",
    "**/.ruff_cache",
]
STAGE = "prod"


class Serving(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, storage: Storage, registry: ModelRegistry,
                 source_root: Path = ROOT) -> None:
        super().__init__(scope, id)
        self.config = config

        # API Gateway and the function each send one Access-Control-Allow-Origin value.
        cors_origin = config.cors_allow_origins[0] if len(config.cors_allow_origins) == 1 else "*"
        code = lambda_.DockerImageCode.from_image_asset(
            str(source_root), file=INFERENCE_DOCKERFILE, exclude=INFERENCE_CONTEXT_EXCLUDE,
            platform=ecr_assets.Platform.LINUX_AMD64)
        fn = container_function(
            self, "InferenceFunction", code=code, key=storage.key, retention_days=config.log_retention_days,
            description="Chest X-ray NORMAL/PNEUMONIA classifier (ONNX Runtime) behind the HTTPS API",
            memory_size=config.inference_memory_mb, timeout=Duration.seconds(config.inference_timeout_seconds),
            ephemeral_storage_mb=1024,
            environment={
                "MODEL_URI": f"ssm:{registry.pointer.parameter_name}",
                "POWERTOOLS_SERVICE_NAME": config.service_name,
                "POWERTOOLS_METRICS_NAMESPACE": config.metrics_namespace,
                "POWERTOOLS_LOG_LEVEL": "INFO",
                "CORS_ALLOW_ORIGIN": cors_origin,
            },
        )
        self.function, self.function_role = fn.function, fn.role
        # The image the registry's model packages name in their inference specification.
        self.image_uri = fn.function.node.default_child.code.image_uri
        for statement in (
            iam.PolicyStatement(sid="ReadModels", actions=["s3:GetObject"],
                                resources=[storage.artifacts_bucket.arn_for_objects(f"{MODELS_PREFIX}*")]),
            iam.PolicyStatement(sid="DecryptModels", actions=["kms:Decrypt"], resources=[storage.key.key_arn]),
            iam.PolicyStatement(sid="ReadPointer", actions=["ssm:GetParameter"], resources=[registry.pointer.parameter_arn]),
        ):
            fn.role.add_to_policy(statement)

        self.access_logs = log_group(self, "AccessLogs", key=storage.key, retention_days=config.log_retention_days)
        self.api = apigw.RestApi(
            self, "Api",
            rest_api_name=f"{config.stack_name}-api",
            description="Chest X-ray pneumonia classifier: POST /predict (API key), GET /health, GET /",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            binary_media_types=BINARY_MEDIA_TYPES,
            cloud_watch_role=True,
            deploy_options=apigw.StageOptions(
                stage_name=STAGE,
                throttling_rate_limit=config.api_throttle_rate_limit,
                throttling_burst_limit=config.api_throttle_burst_limit,
                access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
                access_log_format=apigw.AccessLogFormat.custom(json.dumps({
                    "requestId": "$context.requestId", "ip": "$context.identity.sourceIp",
                    "requestTime": "$context.requestTime", "method": "$context.httpMethod",
                    "path": "$context.resourcePath", "status": "$context.status",
                    "responseLength": "$context.responseLength", "latencyMs": "$context.responseLatency",
                    "integrationLatencyMs": "$context.integrationLatency", "apiKeyId": "$context.identity.apiKeyId",
                    "error": "$context.error.message",
                })),
                # Errors only, and never request or response bodies: images must not reach a log.
                logging_level=apigw.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
            ),
            default_cors_preflight_options=apigw.CorsOptions(
                allow_origins=config.cors_allow_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Content-Type", "X-Api-Key"],
                max_age=Duration.hours(1),
            ),
        )
        integration = apigw.LambdaIntegration(self.function, proxy=True, allow_test_invoke=False)
        self.api.root.add_method("GET", integration)
        self.api.root.add_resource("health").add_method("GET", integration)
        self.predict_method = self.api.root.add_resource("predict").add_method("POST", integration, api_key_required=True)

        # Errors API Gateway answers itself (missing key, throttled, quota spent) use the same
        # JSON error shape as the function (contract 5).
        for response_type, code in ((apigw.ResponseType.DEFAULT_4_XX, "client_error"),
                                    (apigw.ResponseType.DEFAULT_5_XX, "gateway_error")):
            self.api.add_gateway_response(
                f"{code.title().replace('_', '')}Response", type=response_type,
                response_headers={"Access-Control-Allow-Origin": f"'{cors_origin}'"},
                templates={"application/json": '{"error": {"code": "$context.error.responseType", '
                                               '"message": $context.error.messageString}}'},
            )

        self.api_key = self.api.add_api_key("ApiKey", description=f"{config.stack_name} client key for POST /predict")
        self.usage_plan = self.api.add_usage_plan(
            "UsagePlan",
            description="Per-key throttling and quota for POST /predict",
            throttle=apigw.ThrottleSettings(rate_limit=config.api_throttle_rate_limit,
                                            burst_limit=config.api_throttle_burst_limit),
            quota=apigw.QuotaSettings(limit=config.api_quota_limit, period=apigw.Period[config.api_quota_period]),
            api_stages=[apigw.UsagePlanPerApiStage(api=self.api, stage=self.api.deployment_stage)],
        )
        self.usage_plan.add_api_key(self.api_key)

        output(self, "ApiUrl", self.api.url)
        output(self, "ApiKeyId", self.api_key.key_id,
               "aws apigateway get-api-key --include-value --api-key <id> --query value --output text")
        output(self, "InferenceFunctionName", self.function.function_name)
        self._suppressions()

    def _suppressions(self) -> None:
        acknowledge(self.api, [
            ("AwsSolutions-APIG2", "Bodies are images (JPEG, PNG, DICOM) or multipart forms that no API Gateway model "
             "can describe; the function validates type, size and decoding and answers JSON 400/413/415 errors."),
            ("AwsSolutions-APIG3", "Each client holds an API key whose usage plan throttles and caps it, and the stage "
             "is throttled; a WAF web ACL can be attached by organisations that need one."),
            ("AwsSolutions-APIG4", "POST /predict requires an API key bound to a usage plan; GET / (the upload page), "
             "GET /health (the model version) and CORS preflights carry no data and must be reachable before a "
             "client holds a key."),
            ("AwsSolutions-COG4", "The product's clients are scripts and the upload page, each using an API key; no "
             "Cognito user pool exists to authorize against."),
            ("HIPAA.Security-APIGWCacheEnabledAndEncrypted", "Predictions are POST requests on uploaded images, which "
             "API Gateway never caches; a cache would bill hourly and hold nothing."),
            ("HIPAA.Security-APIGWSSLEnabled", "Client certificates authenticate API Gateway to HTTP backends; this "
             "API's only backend is a Lambda function invoked through IAM."),
            ("AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs]",
             "API Gateway's account-level CloudWatch role needs this AWS-managed policy to write execution logs."),
        ])
        acknowledge_wildcards(self.function_role, [r"^Resource::.*/models/\*$"],
                              "Serving reads whichever model.tar.gz the promoted pointer names; those are written "
                              "under models/<training job>/ of the artifacts bucket per run.")
        acknowledge(self.function, [
            ("HIPAA.Security-LambdaInsideVPC", "The function reaches only S3 and SSM through IAM over TLS and is invoked "
             "by API Gateway; a VPC would add NAT or endpoint cost without isolating a private resource."),
            ("HIPAA.Security-LambdaConcurrency", "Concurrency is bounded upstream by the stage throttle and each key's "
             "usage plan; reserving it would fail deploys in accounts with the default concurrency quota."),
            ("HIPAA.Security-LambdaDLQ", "API Gateway invokes the function synchronously and the client receives every "
             "error; there is no asynchronous event to keep."),
        ])
