"""Every deploy-time knob, read from one place.

The defaults live in ``cdk.json`` under ``context``; ``cdk deploy -c key=value`` overrides any of
them. The stack (through ``node.try_get_context``) and the ``launch`` command (through
:func:`load`) build the same :class:`Config`, so a training job started by hand is configured
exactly like one started by the pipeline.

Values given on the command line arrive as strings; :meth:`Config.from_context` converts them
to the type of the default in ``cdk.json`` (numbers, booleans, JSON objects and lists).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.evaluation import METRIC_NAMES, PAIRED_METRICS

from .functions.common import (  # noqa: F401 (re-exported)
    CHECKPOINTS_PREFIX,
    DATASETS_PREFIX,
    MODELS_PREFIX,
    REFUSED_RUNS_PREFIX,
)

ROOT = Path(__file__).resolve().parents[1]
CDK_JSON = ROOT / "cdk.json"

# The training script (contract 2); train.py puts the directory above it on sys.path so that
# `import shared` works when run as a file. The training image runs it through its entrypoint,
# which reads SageMaker's /opt/ml contract (training_job/container.py).
TRAINING_PROGRAM = "training_job/train.py"
TRAINING_ENTRYPOINT = "training_job/container.py"
TRAINING_DOCKERFILE = "training_job/Dockerfile"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"

_ECR_URI = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                      r"(?P<repo>[^:@]+)[:@].+$")

# One metric line per epoch (contract 2), e.g.
#   epoch=3 train_loss=0.1234 val_loss=0.2345 val_auc=0.9876 val_acc=0.9500 lr=0.000100
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = tuple(
    {"Name": name, "Regex": rf"\b{name}={_NUMBER}"}
    for name in ("train_loss", "val_loss", "val_auc", "val_acc", "lr")
)

_KNOWN_PERIODS = ("DAY", "WEEK", "MONTH")
API_AUTHORIZATIONS = ("apiKey", "iam", "cognito")
_COGNITO_POOL_ARN = re.compile(r"arn:aws[a-z-]*:cognito-idp:[a-z0-9-]+:\d{12}:userpool/[\w-]+_[0-9a-zA-Z]+")
# Keys of predictionMixBand: the share of PNEUMONIA answers that is normal, and how it is watched.
PREDICTION_MIX_KEYS = ("low", "high", "window_hours", "min_predictions")


class ConfigError(ValueError):
    """A context value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Config:
    stack_name: str = "CxrPneumonia"
    region: str = ""
    training_image_uri: str = ""
    training_instance_type: str = "ml.g4dn.xlarge"
    training_instance_count: int = 1
    training_volume_size_gb: int = 50
    training_network_isolation: bool = True
    training_vpc_subnet_ids: list[str] = field(default_factory=list)
    training_vpc_security_group_ids: list[str] = field(default_factory=list)
    max_training_runs_per_day: int = 4
    monthly_budget_usd: float = 0.0
    use_spot_instances: bool = True
    max_runtime_seconds: int = 7200
    max_wait_seconds: int = 14400
    hyperparameters: dict[str, str] = field(default_factory=dict)
    gate_thresholds: dict[str, float] = field(default_factory=dict)
    gate_require_improvement: bool = False
    gate_compare_metric: str = "roc_auc"
    gate_min_improvement: float = 0.0
    gate_non_inferiority_margin: float = 0.01
    evaluation_dataset_uri: str = ""
    inference_memory_mb: int = 2048
    inference_timeout_seconds: int = 29
    inference_reserved_concurrency: int = 0
    inference_provisioned_concurrency: int = 0
    api_throttle_rate_limit: float = 10.0
    api_throttle_burst_limit: int = 20
    api_quota_limit: int = 5000
    api_quota_period: str = "DAY"
    cors_allow_origins: list[str] = field(default_factory=list)
    api_authorization: str = "apiKey"
    cognito_user_pool_arn: str = ""
    waf_enabled: bool = False
    waf_rate_limit: int = 1000
    prediction_mix_band: dict[str, float] = field(default_factory=dict)
    notification_email: str = ""
    metrics_namespace: str = "CxrPneumonia"
    service_name: str = "cxr-inference"
    log_retention_days: int = 90
    checkpoint_expiration_days: int = 14
    rejected_model_expiration_days: int = 30
    noncurrent_version_expiration_days: int = 30
    access_log_expiration_days: int = 365

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_context(cls, get: Callable[[str], Any], defaults: Mapping[str, Any] | None = None) -> Config:
        """Build from a context getter (``node.try_get_context``); missing keys use cdk.json."""
        defaults = dict(cdk_json_context() if defaults is None else defaults)
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = context_key(f.name)
            raw = get(key)
            if raw is None:
                raw = defaults.get(key)
            if raw is None:
                continue
            values[f.name] = _coerce(key, raw, f.default if f.default is not MISSING else None,
                                     f.default_factory() if f.default_factory is not MISSING else None)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def with_overrides(self, **changes: Any) -> Config:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update({k: v for k, v in changes.items() if v is not None})
        cfg = Config(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.max_runtime_seconds < 60:
            problems.append("maxRuntimeSeconds must be at least 60")
        if self.use_spot_instances and self.max_wait_seconds < self.max_runtime_seconds:
            problems.append("maxWaitSeconds must be at least maxRuntimeSeconds when useSpotInstances is on "
                            f"(got {self.max_wait_seconds} < {self.max_runtime_seconds})")
        if not self.training_instance_type.startswith("ml."):
            problems.append(f"trainingInstanceType {self.training_instance_type!r} is not a SageMaker type (ml.*)")
        if self.training_instance_count < 1:
            problems.append("trainingInstanceCount must be at least 1")
        if not 1 <= self.inference_timeout_seconds <= 900:
            problems.append("inferenceTimeoutSeconds must be between 1 and 900")
        if not 128 <= self.inference_memory_mb <= 10240:
            problems.append("inferenceMemoryMb must be between 128 and 10240")
        if self.api_quota_period not in _KNOWN_PERIODS:
            problems.append(f"apiQuotaPeriod must be one of {', '.join(_KNOWN_PERIODS)}")
        if self.api_throttle_burst_limit < 1 or self.api_throttle_rate_limit <= 0 or self.api_quota_limit < 1:
            problems.append("API throttling rate, burst and quota must be positive")
        for name, value in self.gate_thresholds.items():
            if name not in METRIC_NAMES:
                problems.append(f"gateThresholds.{name} is not a metric the Evaluate step reports "
                                f"({', '.join(METRIC_NAMES)})")
            elif not 0.0 <= float(value) <= 1.0:
                problems.append(f"gateThresholds.{name} must be between 0 and 1")
        if self.gate_compare_metric not in PAIRED_METRICS:
            problems.append(f"gateCompareMetric {self.gate_compare_metric!r} is not one the paired comparison "
                            f"supports ({', '.join(PAIRED_METRICS)})")
        if not 0.0 <= self.gate_non_inferiority_margin < 1.0:
            problems.append("gateNonInferiorityMargin must be at least 0 and below 1")
        if not -1.0 < self.gate_min_improvement < 1.0:
            problems.append("gateMinImprovement must be between -1 and 1")
        if self.evaluation_dataset_uri and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?",
                                                              self.evaluation_dataset_uri):
            problems.append(f"evaluationDatasetUri {self.evaluation_dataset_uri!r} is not an s3://bucket/prefix/ URI")
        for key, value in self.hyperparameters.items():
            if key.startswith("sagemaker_"):
                problems.append(f"hyperparameters.{key}: sagemaker_* names are set by the pipeline")
            if len(json.dumps(value)) > 2500:
                problems.append(f"hyperparameters.{key} is longer than SageMaker's 2500 characters")
        if bool(self.training_vpc_subnet_ids) != bool(self.training_vpc_security_group_ids):
            problems.append("trainingVpcSubnetIds and trainingVpcSecurityGroupIds go together: set both or neither")
        if self.max_training_runs_per_day < 0:
            problems.append("maxTrainingRunsPerDay must be 0 (no cap) or more")
        if self.monthly_budget_usd < 0:
            problems.append("monthlyBudgetUsd must be 0 (no budget) or more")
        if self.inference_reserved_concurrency < 0 or self.inference_provisioned_concurrency < 0:
            problems.append("inferenceReservedConcurrency and inferenceProvisionedConcurrency must be 0 or more")
        if (self.inference_reserved_concurrency and
                self.inference_provisioned_concurrency > self.inference_reserved_concurrency):
            problems.append("inferenceProvisionedConcurrency cannot exceed inferenceReservedConcurrency")
        if self.api_authorization not in API_AUTHORIZATIONS:
            problems.append(f"apiAuthorization must be one of {', '.join(API_AUTHORIZATIONS)}")
        if self.api_authorization == "cognito" and not _COGNITO_POOL_ARN.fullmatch(self.cognito_user_pool_arn):
            problems.append("apiAuthorization=cognito needs cognitoUserPoolArn, the ARN of an existing user pool")
        if not 10 <= self.waf_rate_limit <= 2_000_000_000:
            problems.append("wafRateLimit must be between 10 and 2000000000 requests per 5 minutes")
        if "*" in self.cors_allow_origins and len(self.cors_allow_origins) > 1:
            problems.append("corsAllowOrigins: '*' cannot be combined with named origins")
        for origin in self.cors_allow_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s*]+", origin):
                problems.append(f"corsAllowOrigins: {origin!r} is not an origin (scheme://host[:port])")
        unknown = set(self.prediction_mix_band) - set(PREDICTION_MIX_KEYS)
        if unknown:
            problems.append(f"predictionMixBand: unknown keys {sorted(unknown)}; known: {', '.join(PREDICTION_MIX_KEYS)}")
        band = self.prediction_mix()
        if not 0.0 <= band["low"] < band["high"] <= 1.0:
            problems.append("predictionMixBand needs 0 <= low < high <= 1")
        if band["window_hours"] < 1 or band["min_predictions"] < 1:
            problems.append("predictionMixBand.window_hours and min_predictions must be at least 1")
        if self.notification_email and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", self.notification_email):
            problems.append(f"notificationEmail {self.notification_email!r} is not an e-mail address")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,100}", self.stack_name):
            problems.append("stackName must start with a letter and hold letters, digits and dashes")
        if problems:
            raise ConfigError("invalid context: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived values

    def training_hyperparameters(self) -> dict[str, str]:
        """The user-facing hyperparameters as the SageMaker SDK sends them: each value JSON-encoded
        (``"gpu"`` -> ``'"gpu"'``, ``10`` -> ``'10'``, ``True`` -> ``'true'``), the encoding the
        container decodes (:func:`training_job.container.decode_hyperparameters`)."""
        return encode_hyperparameters(self.hyperparameters)

    def prediction_mix(self) -> dict[str, float]:
        """The band of the share of PNEUMONIA answers outside which the drift alarm fires.

        Defaults: the expected share is prevalence x sensitivity + (1 - prevalence) x (1 - specificity).
        On the Kaggle test split (62.5 % PNEUMONIA) and the held-out part of train (74 %), with the
        gate's floor of sensitivity 0.9 and specificity 0.7 at one end and the reference model's
        figures at the other, it lies between about 0.60 and 0.80 (README, Results); 0.45-0.90 leaves
        room for ordinary day-to-day case mix. ``window_hours``: the window the share is taken over;
        ``min_predictions``: fewer answers than this in a window are not judged."""
        band = {"low": 0.45, "high": 0.90, "window_hours": 6, "min_predictions": 30}
        band.update({k: float(v) for k, v in self.prediction_mix_band.items() if k in band})
        band["window_hours"], band["min_predictions"] = int(band["window_hours"]), int(band["min_predictions"])
        return band

    def training_volume_kms(self) -> bool:
        """Whether the training volume can take a KMS key: not on instance types with NVMe instance
        storage, which the hardware encrypts and for which SageMaker refuses ``VolumeKmsKeyId``."""
        return not instance_storage(self.training_instance_type)

    def gate_settings(self) -> dict[str, Any]:
        """What the quality-gate step needs (handed to the function as JSON)."""
        return {
            "thresholds": {k: float(v) for k, v in self.gate_thresholds.items()},
            "require_improvement": self.gate_require_improvement,
            "compare_metric": self.gate_compare_metric,
            "min_improvement": float(self.gate_min_improvement),
            "non_inferiority_margin": float(self.gate_non_inferiority_margin),
        }



def ecr_repository_arn(image_uri: str) -> str:
    """The ECR repository ARN an image URI pulls from (``*`` parts for an image outside ECR)."""
    m = _ECR_URI.match(image_uri)
    if not m:
        return "arn:aws:ecr:*:*:repository/*"
    partition = "aws-cn" if ".amazonaws.com.cn/" in image_uri else "aws"
    return f"arn:{partition}:ecr:{m['region']}:{m['account']}:repository/{m['repo']}"


def context_key(attr: str) -> str:
    """``max_wait_seconds`` -> ``maxWaitSeconds`` (the cdk.json spelling)."""
    head, *rest = attr.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def cdk_json_context(path: Path = CDK_JSON) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return dict(doc.get("context", {}))


def load(overrides: Mapping[str, Any] | None = None, path: Path = CDK_JSON) -> Config:
    """The configuration outside CDK: cdk.json defaults, then ``overrides`` (context spelling)."""
    defaults = cdk_json_context(path)
    over = dict(overrides or {})
    return Config.from_context(lambda k: over.get(k), defaults)


def encode_hyperparameters(hyperparameters: Mapping[str, Any]) -> dict[str, str]:
    """``{name: json.dumps(value)}``, as the SageMaker Python SDK's framework estimators send
    hyperparameters (``sagemaker.estimator.Framework._json_encode_hyperparameters``)."""
    return {str(k): json.dumps(v) for k, v in hyperparameters.items()}


# Instance families with NVMe instance storage: SageMaker encrypts those volumes in hardware and
# rejects a VolumeKmsKeyId for them (CreateTrainingJob, ResourceConfig.VolumeKmsKeyId).
_INSTANCE_STORAGE_FAMILIES = re.compile(r"ml\.(g4dn|g5|g6|g6e|gr6|p3dn|p4d|p4de|p5|p5e|p5en|p6-b200|trn1|trn1n|trn2|"
                                        r"c5d|m5d|r5d|c6id|m6id|r6id)\.")


def instance_storage(instance_type: str) -> bool:
    """True for the SageMaker instance types whose training volume is NVMe instance storage."""
    return bool(_INSTANCE_STORAGE_FAMILIES.match(instance_type))


def _coerce(key: str, raw: Any, default: Any, default_factory_value: Any) -> Any:
    """Context values from ``-c`` are strings; turn them into the type the default has."""
    template = default if default is not None else default_factory_value
    try:
        if isinstance(template, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off", ""):
                return False
            raise ValueError(f"expected true or false, got {raw!r}")
        if isinstance(template, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"expected a whole number, got {raw!r}")
            return int(float(raw)) if isinstance(raw, str) else int(raw)
        if isinstance(template, float):
            return float(raw)
        if isinstance(template, (dict, list)):
            value = raw
            if isinstance(raw, str):
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError:
                    if not isinstance(template, list):
                        raise
                    value = [part.strip() for part in raw.split(",") if part.strip()]
            if isinstance(template, list) and isinstance(value, str):
                value = [value]
            if not isinstance(value, type(template)):
                raise ValueError(f"expected a JSON {type(template).__name__}")
            return value
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"context value {key}={raw!r}: {exc}") from None
