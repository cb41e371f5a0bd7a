"""Settings read from the function's environment, once per cold start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.api import parse_origins

# One service name for the handler's logger, its child loggers and the metrics' dimension.
SERVICE_NAME = os.environ.get("POWERTOOLS_SERVICE_NAME", "cxr-inference")
METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "CxrPneumonia")


def _int_env(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return max(minimum, int(raw))
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    # A bundle folder, a model.tar.gz path, s3://bucket/key/model.tar.gz, or ssm:<parameter name>.
    model_uri: str | None
    # How long a promoted-model pointer read from SSM is trusted before it is read again.
    pointer_ttl_seconds: int = 60
    # /tmp is the only writable place in Lambda; downloads and unpacked bundles live here.
    cache_dir: Path = Path("/tmp/cxr-model")
    # ONNX Runtime intra-op threads; 0 means one per vCPU the function was given.
    threads: int = 0
    # After a failed load, requests get 503 for this long before the next attempt (also Retry-After).
    retry_seconds: int = 10
    # While a fallback model serves, the promoted one is tried again at most this often.
    fallback_retry_seconds: int = 60
    # Loading during the init phase keeps the download and session creation off the first request.
    load_at_init: bool = True
    # Origins allowed to call the API from a browser; ("*",) allows any (shared.api.cors_allow_origin).
    cors_allow_origins: tuple[str, ...] = ("*",)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            model_uri=os.environ.get("MODEL_URI", "").strip() or None,
            pointer_ttl_seconds=_int_env("MODEL_POINTER_TTL_SECONDS", 60),
            cache_dir=Path(os.environ.get("MODEL_CACHE_DIR", "/tmp/cxr-model")),
            threads=_int_env("MODEL_THREADS", 0),
            retry_seconds=_int_env("MODEL_RETRY_SECONDS", 10),
            fallback_retry_seconds=_int_env("MODEL_FALLBACK_RETRY_SECONDS", 60),
            load_at_init=_bool_env("MODEL_LOAD_AT_INIT", True),
            cors_allow_origins=tuple(parse_origins(os.environ.get("CORS_ALLOW_ORIGINS")
                                                   or os.environ.get("CORS_ALLOW_ORIGIN"))),
        )
