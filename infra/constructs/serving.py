"""The HTTPS API: API Gateway (REST) in front of the container Lambda that runs the model.

Routes (contract 5):

- ``POST /predict``: needs an API key (header ``x-api-key``); the usage plan throttles and caps
  each key. ``apiAuthorization`` adds IAM (SigV4-signed requests) or a Cognito user-pool
  authorizer (an ID token in ``Authorization``) on top of the key. Raw image bodies are passed to
  the function base64-encoded (binary media types).
- ``GET /`` (the upload page) and ``GET /health`` (names the model in service) are open: a
  browser must load the page before it has a key to send, and monitoring probes the health
  route. Neither returns anything but the page and the model's version.

The function image is built from ``inference_lambda/Dockerfile`` with the repository root as its
build context (the image needs ``shared/`` too). It reads the promoted-model pointer from SSM at
cold start (``MODEL_URI=ssm:<parameter>``) and may read only ``models/`` of the artifacts bucket.

Options (cdk.json context): ``inferenceReservedConcurrency`` and ``inferenceProvisionedConcurrency``
(the API then calls a ``live`` alias holding the provisioned environments), ``wafEnabled`` with
``wafRateLimit`` (a WAF web ACL with a per-IP rate-based rule on the stage), ``corsAllowOrigins``
(a named origin is echoed back only to itself; ``*`` only when it is the whole list).
"""

from __future__ import annotations

import json
from pathlib import Path

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cognito as cognito
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_wafv2 as wafv2
from constructs import Construct

from shared.api import (
    BINARY_MEDIA_TYPES,
    CORS_ALLOW_HEADERS,
    CORS_ALLOW_METHODS,
    CORS_MAX_AGE_SECONDS,
    STAGE_NAME,
)

from ..config import MODELS_PREFIX, ROOT, Config
from ..nag import acknowledge, acknowledge_wildcards
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
STAGE = STAGE_NAME
# Headers a browser must be allowed to send for each authorization mode (SigV4 or a user-pool token).
_AUTH_HEADERS = {"iam": ["Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-Sha256"],
                 "cognito": ["Authorization"]}


class Serving(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, storage: Storage, registry: ModelRegistry,
                 source_root: Path = ROOT) -> None:
        super().__init__(scope, id)
        self.config = config

        # The function answers each allowed origin itself; API Gateway's own error responses carry
        # one fixed value, so with several origins they name the first (never "*" once one is configured).
        origins = list(config.cors_allow_origins) or ["*"]
        gateway_origin = origins[0]
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
                "CORS_ALLOW_ORIGINS": ",".join(origins),
            },
        )
        cfn_function = fn.function.node.default_child
        if config.inference_reserved_concurrency:
            cfn_function.reserved_concurrent_executions = config.inference_reserved_concurrency
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
                allow_origins=origins,
                allow_methods=list(CORS_ALLOW_METHODS),
                allow_headers=[*CORS_ALLOW_HEADERS, *_AUTH_HEADERS.get(config.api_authorization, [])],
                max_age=Duration.seconds(CORS_MAX_AGE_SECONDS),
            ),
        )
        target: lambda_.IFunction = self.function
        if config.inference_provisioned_concurrency:
            # Warm environments kept ready; the API invokes the alias that holds them.
            self.alias = lambda_.Alias(self, "LiveAlias", alias_name="live", version=self.function.current_version,
                                       provisioned_concurrent_executions=config.inference_provisioned_concurrency)
            target = self.alias
        integration = apigw.LambdaIntegration(target, proxy=True, allow_test_invoke=False)
        self.api.root.add_method("GET", integration)
        self.api.root.add_resource("health").add_method("GET", integration)
        self.predict_method = self.api.root.add_resource("predict").add_method(
            "POST", integration, api_key_required=True, **self._authorization(config))

        # Errors API Gateway answers itself (missing key, throttled, quota spent) use the same
        # JSON error shape as the function (contract 5).
        for response_type, code in ((apigw.ResponseType.DEFAULT_4_XX, "client_error"),
                                    (apigw.ResponseType.DEFAULT_5_XX, "gateway_error")):
            self.api.add_gateway_response(
                f"{code.title().replace('_', '')}Response", type=response_type,
                response_headers={"Access-Control-Allow-Origin": f"'{gateway_origin}'"},
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
        if config.waf_enabled:
            self._web_acl(config, storage)
        self._suppressions()

    def _authorization(self, config: Config) -> dict:
        """``POST /predict``'s authorization beside the API key (``apiAuthorization``)."""
        if config.api_authorization == "iam":
            return {"authorization_type": apigw.AuthorizationType.IAM}
        if config.api_authorization == "cognito":
            pool = cognito.UserPool.from_user_pool_arn(self, "UserPool", config.cognito_user_pool_arn)
            authorizer = apigw.CognitoUserPoolsAuthorizer(self, "CognitoAuthorizer", cognito_user_pools=[pool],
                                                          identity_source="method.request.header.Authorization")
            return {"authorization_type": apigw.AuthorizationType.COGNITO, "authorizer": authorizer}
        return {}

    def _web_acl(self, config: Config, storage: Storage) -> None:
        """A regional WAF web ACL on the stage: requests over ``wafRateLimit`` per IP per 5 minutes are blocked.

        No AWS managed rule group: their body-size rules inspect only the first 8 KB and would block
        every image upload."""
        visibility = wafv2.CfnWebACL.VisibilityConfigProperty(
            cloud_watch_metrics_enabled=True, sampled_requests_enabled=False,
            metric_name=f"{config.stack_name}-api-waf")
        self.web_acl = wafv2.CfnWebACL(
            self, "WebAcl", scope="REGIONAL", default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            description="Per-IP rate limit in front of the classifier API",
            visibility_config=visibility,
            rules=[wafv2.CfnWebACL.RuleProperty(
                name="RateLimitPerIp", priority=0, action=wafv2.CfnWebACL.RuleActionProperty(block={}),
                statement=wafv2.CfnWebACL.StatementProperty(rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                    limit=config.waf_rate_limit, aggregate_key_type="IP", evaluation_window_sec=300)),
                visibility_config=wafv2.CfnWebACL.VisibilityConfigProperty(
                    cloud_watch_metrics_enabled=True, sampled_requests_enabled=False,
                    metric_name=f"{config.stack_name}-rate-limit"))],
        )
        wafv2.CfnWebACLAssociation(self, "WebAclAssociation", web_acl_arn=self.web_acl.attr_arn,
                                   resource_arn=self.api.deployment_stage.stage_arn)
        # WAF delivers only to log groups named aws-waf-logs-*; keys and tokens are redacted.
        waf_logs = log_group(self, "WafLogs", key=storage.key, retention_days=config.log_retention_days)
        waf_logs.node.default_child.add_property_override("LogGroupName", f"aws-waf-logs-{config.stack_name}")
        wafv2.CfnLoggingConfiguration(
            self, "WafLogging", resource_arn=self.web_acl.attr_arn, log_destination_configs=[waf_logs.log_group_arn],
            redacted_fields=[wafv2.CfnLoggingConfiguration.FieldToMatchProperty(single_header={"Name": name})
                             for name in ("x-api-key", "authorization")])

    def _suppressions(self) -> None:
        cfg = self.config
        if not cfg.waf_enabled:
            acknowledge(self.api, [
                ("AwsSolutions-APIG3", "Each client holds an API key whose usage plan throttles and caps it, and the "
                 "stage is throttled; the wafEnabled context switch attaches a rate-limiting WAF web ACL."),
            ])
        acknowledge(self.api, [
            ("AwsSolutions-COG4", "GET / (the upload page), GET /health and CORS preflights are open by design; POST "
             "/predict takes an API key, and a Cognito user-pool authorizer as well when apiAuthorization=cognito."
             if cfg.api_authorization == "cognito" else
             "The product's clients are scripts and the upload page, each using an API key (apiAuthorization=iam adds "
             "SigV4, =cognito a user-pool authorizer); this deployment has no user pool to authorize against."),
        ])
        acknowledge(self.api, [
            ("AwsSolutions-APIG2", "Bodies are images (JPEG, PNG, DICOM) or multipart forms that no API Gateway model "
             "can describe; the function validates type, size and decoding and answers JSON 400/413/415 errors."),
            ("AwsSolutions-APIG4", "POST /predict requires an API key bound to a usage plan; GET / (the upload page), "
             "GET /health (the model version) and CORS preflights carry no data and must be reachable before a "
             "client holds a key."),
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
            ("HIPAA.Security-LambdaDLQ", "API Gateway invokes the function synchronously and the client receives every "
             "error; there is no asynchronous event to keep."),
        ])
        if not cfg.inference_reserved_concurrency:
            acknowledge(self.function, [
                ("HIPAA.Security-LambdaConcurrency", "Concurrency is bounded upstream by the stage throttle and each "
                 "key's usage plan; reserving it (inferenceReservedConcurrency) would fail deploys in accounts with "
                 "the default concurrency quota, so it is opt-in."),
            ])
