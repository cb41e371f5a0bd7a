"""Which model is in service: where ``MODEL_URI`` points, loading it once, and swapping it on promotion.

``MODEL_URI`` forms:

- a bundle folder (``/opt/model``) or a ``model.tar.gz`` path (``file://`` prefix allowed);
- ``s3://bucket/key/model.tar.gz``: downloaded once per cold start into the cache folder (/tmp);
- ``ssm:<parameter name>``: the promoted-model pointer (:mod:`shared.pointer`). The archive it names
  is downloaded, its SHA-256 checked against the pointer's, and unpacked. The pointer is read again
  at most every ``MODEL_POINTER_TTL_SECONDS``; when it names another archive, that model is loaded
  and swapped in, so promotion needs no redeploy.

The last good model: when the promoted archive cannot be loaded (missing, corrupt, checksum
mismatch), an environment serves the pointer's ``previous`` model (at a cold start) or keeps the
model it already serves (on a promotion), says so in ``/health`` (``fallback``), emits the
``ModelFallback`` metric, and tries the promoted archive again at most every
``MODEL_FALLBACK_RETRY_SECONDS`` (60) until it loads or the pointer changes. Only when no model
loads at all is the answer 503.

The ONNX Runtime session is created when the model loads, once per cold start (and once per swap).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from shared.bundle import ARCHIVE_NAME, Bundle, file_sha256, read_bundle, unpack
from shared.pointer import ModelPointer, PointerError
from shared.predictor import OnnxPredictor

from .config import METRICS_NAMESPACE, SERVICE_NAME, Settings
from .errors import ModelUnavailable

log = Logger(service=SERVICE_NAME, child=True)

UNAVAILABLE = "no model can be served right now; retry later (the function's logs say why)"
SSM_PREFIX = "ssm:"
S3_PREFIX = "s3://"


class ModelSourceError(RuntimeError):
    """The model named by ``MODEL_URI`` cannot be fetched or trusted; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    bundle: Bundle
    predictor: OnnxPredictor
    source: str  # MODEL_URI as configured
    location: str  # where the bundle came from (the pointer's target for ssm:)
    sha256: str | None  # of model.tar.gz, when it came as an archive
    loaded_at: str
    load_seconds: float
    pointer: ModelPointer | None = None
    # Set while this model serves because the promoted one (this pointer) cannot be loaded.
    fallback_for: ModelPointer | None = None
    fallback_since: str | None = None

    @property
    def source_kind(self) -> str:
        if self.source.startswith(SSM_PREFIX):
            return "ssm-pointer"
        return "s3" if self.location.startswith(S3_PREFIX) else "local"

    def public(self) -> dict[str, Any]:
        """What ``GET /health`` shows: the model, not where the account keeps it (no bucket or path)."""
        b = self.bundle
        return {
            "version": b.version,
            "trained_at": b.trained_at,
            "threshold": b.threshold,
            "class_names": list(b.class_names),
            "positive_class": b.class_names[b.positive_index],
            "architecture": b.meta.get("architecture"),
            "input_size": b.preprocessing.size,
            "source": self.source_kind,
            "sha256": self.sha256,
            "loaded_at": self.loaded_at,
            "promoted_at": self.pointer.promoted_at if self.pointer else None,
            "fallback": self.fallback_for is not None,
        }

    def describe(self) -> dict[str, Any]:
        """For the function's own logs: also where the model came from."""
        return {**self.public(), "model_uri": self.source, "location": self.location}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket or not key:
        raise ModelSourceError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


class ModelStore:
    """Holds the model in service for this execution environment; thread-safe."""

    def __init__(self, settings: Settings, *, s3_client_factory: Callable[[], Any] | None = None,
                 ssm_provider: Any = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._s3_factory = s3_client_factory
        self._s3 = None
        self._ssm = ssm_provider
        self._clock = clock
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._failure: tuple[float, str] | None = None  # (when, message) of the last failed cold load
        # (uri, sha256) of a promoted archive that failed to load, and when it was last tried.
        self._rejected_pointer: tuple[str, str] | None = None
        self._rejected_at = 0.0
        self._owned_dirs: dict[str, Path] = {}  # cache folders this store created, by sha256/uri

    # -- public --------------------------------------------------------------------------------

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    @property
    def last_error(self) -> str | None:
        """Why the last cold load failed (for logs and tests; clients get a generic 503)."""
        return self._failure[1] if self._failure else None

    def fallback(self) -> dict[str, Any] | None:
        """For ``GET /health``: the promoted model that cannot be loaded, while another one serves."""
        model = self._model
        if model is None or model.fallback_for is None:
            return None
        p = model.fallback_for
        wait = self.settings.fallback_retry_seconds - (self._clock() - self._rejected_at)
        return {"promoted_version": p.model_version, "promoted_at": p.promoted_at, "since": model.fallback_since,
                "reason": "the promoted model cannot be loaded; the function's logs say why",
                "next_retry_seconds": max(0, int(wait + 0.999))}

    def get(self) -> LoadedModel:
        """The model to answer with; raises :class:`ModelUnavailable` (503) when there is none."""
        with self._lock:
            if self._model is None:
                return self._cold_load()
            if self._is_pointer:
                self._maybe_swap()
            return self._model

    def warm_up(self) -> None:
        """Load now (the init phase); a failure is remembered and retried by later requests."""
        try:
            self.get()
        except ModelUnavailable:
            pass

    # -- loading -------------------------------------------------------------------------------

    @property
    def _is_pointer(self) -> bool:
        return bool(self.settings.model_uri and self.settings.model_uri.startswith(SSM_PREFIX))

    def _cold_load(self) -> LoadedModel:
        retry = self.settings.retry_seconds
        if self._failure is not None and self._clock() - self._failure[0] < retry:
            raise ModelUnavailable(UNAVAILABLE, retry)
        uri = self.settings.model_uri
        try:
            if not uri:
                raise ModelSourceError("MODEL_URI is not set: the function has no model to serve")
            if self._is_pointer:
                pointer = self._read_pointer(force=True)
                self._model = self._load_promoted_or_previous(pointer)
            else:
                self._model = self._load_location(uri, expected_sha256=None)
        except Exception as exc:  # ONNX Runtime's load errors derive from Exception only
            self._failure = (self._clock(), f"the model cannot be loaded: {exc}")
            log.error("model load failed", extra={"model_uri": uri, "reason": str(exc)})
            # The reason names buckets, keys and paths: it stays in the logs.
            raise ModelUnavailable(UNAVAILABLE, retry) from None
        self._failure = None
        log.info("model loaded", extra={"model": self._model.describe(), "load_seconds": self._model.load_seconds})
        return self._model

    def _load_promoted_or_previous(self, pointer: ModelPointer) -> LoadedModel:
        """The promoted model; if it cannot be loaded, the pointer's previous one as a fallback."""
        try:
            model = self._load_pointer(pointer)
        except Exception as exc:  # noqa: BLE001 - any load failure leads to the fallback
            if pointer.previous is None:
                raise
            try:
                model = self._load_pointer(pointer.previous)
            except Exception as prev_exc:
                raise ModelSourceError(f"the promoted model cannot be loaded ({exc}), nor the previous one "
                                       f"({prev_exc})") from None
            model = replace(model, fallback_for=pointer, fallback_since=_now())
            self._promoted_failed(pointer, exc, serving=model)
            log.warning("serving the previous model", extra={"model": model.describe(),
                                                             "promoted_version": pointer.model_version})
            return model
        self._rejected_pointer = None
        return model

    def _promoted_failed(self, pointer: ModelPointer, exc: Exception, serving: LoadedModel | None) -> None:
        self._rejected_pointer = (pointer.model_uri, pointer.sha256)
        self._rejected_at = self._clock()
        log.error("promoted model failed to load", extra={
            "model_uri": pointer.model_uri, "model_version": pointer.model_version, "reason": str(exc),
            "serving_version": serving.bundle.version if serving else None,
            "retry_seconds": self.settings.fallback_retry_seconds})
        _emit_fallback()

    def _maybe_swap(self) -> None:
        current = self._model
        assert current is not None
        try:
            pointer = self._read_pointer(force=False)
        except (ModelSourceError, PointerError) as exc:
            log.warning("model pointer unreadable; keeping the model in service", extra={"reason": str(exc)})
            return
        key = (pointer.model_uri, pointer.sha256)
        if current.pointer is not None and current.fallback_for is None and (
                current.pointer.model_uri, current.pointer.sha256) == key:
            return
        if key == self._rejected_pointer and self._clock() - self._rejected_at < self.settings.fallback_retry_seconds:
            return
        if pointer.sha256 == current.sha256:  # the same archive, promoted again or copied elsewhere
            self._model = replace(current, pointer=pointer, location=pointer.model_uri, fallback_for=None,
                                  fallback_since=None)
            self._rejected_pointer = None
            return
        try:
            new = self._load_pointer(pointer)
        except Exception as exc:  # whatever went wrong, the model in service keeps answering
            self._promoted_failed(pointer, exc, serving=current)
            if current.fallback_for is None or (current.fallback_for.model_uri,
                                                current.fallback_for.sha256) != key:
                self._model = replace(current, fallback_for=pointer, fallback_since=_now())
            return
        self._model = new
        self._rejected_pointer = None
        log.info("model swapped", extra={"previous_version": current.bundle.version, "model": new.describe(),
                                         "after_fallback": current.fallback_for is not None})
        self._forget(current)

    def _read_pointer(self, force: bool) -> ModelPointer:
        name = self.settings.model_uri[len(SSM_PREFIX):]  # type: ignore[index]
        if not name:
            raise ModelSourceError("MODEL_URI 'ssm:' names no parameter")
        if self._ssm is None:
            from aws_lambda_powertools.utilities.parameters import SSMProvider

            self._ssm = SSMProvider()
        try:
            value = self._ssm.get(name, max_age=self.settings.pointer_ttl_seconds, force_fetch=force)
        except Exception as exc:  # GetParameterError wraps every SDK failure
            raise ModelSourceError(f"cannot read the model pointer {name!r} from SSM: {exc}") from None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return ModelPointer.from_json(value)

    def _load_pointer(self, pointer: ModelPointer) -> LoadedModel:
        model = self._load_location(pointer.model_uri, expected_sha256=pointer.sha256)
        return replace(model, pointer=pointer)

    def _load_location(self, location: str, expected_sha256: str | None) -> LoadedModel:
        t0 = time.perf_counter()
        if location.startswith("file://"):
            location = location[len("file://"):]
        sha = None
        if location.startswith(S3_PREFIX):
            archive, folder = self._download(location, expected_sha256)
            sha = expected_sha256 or file_sha256(archive)
            bundle = self._unpack(archive, folder)
        else:
            path = Path(location)
            if path.is_dir():
                if expected_sha256:
                    raise ModelSourceError(f"the pointer names a folder ({location}); it must name a {ARCHIVE_NAME}")
                bundle = read_bundle(path)
            elif path.is_file():
                sha = file_sha256(path)
                _check_sha(location, sha, expected_sha256)
                bundle = self._unpack(path, self._folder_for(sha))
            else:
                raise ModelSourceError(f"{location} does not exist")
        # No spin-waiting: between two inferences this process decodes images on the same vCPUs.
        predictor = OnnxPredictor(bundle, threads=self.settings.threads or None, spin_wait=False)
        return LoadedModel(bundle=bundle, predictor=predictor, source=self.settings.model_uri or location,
                           location=location, sha256=sha, loaded_at=_now(),
                           load_seconds=round(time.perf_counter() - t0, 3))

    def _folder_for(self, key: str) -> Path:
        folder = self.settings.cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16]
        self._owned_dirs[key] = folder
        return folder

    def _download(self, uri: str, expected_sha256: str | None) -> tuple[Path, Path]:
        bucket, key = parse_s3_uri(uri)
        folder = self._folder_for(expected_sha256 or uri)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / ARCHIVE_NAME
        if self._s3 is None:
            self._s3 = self._s3_factory() if self._s3_factory else _default_s3_client()
        try:
            self._s3.download_file(bucket, key, str(archive))
        except Exception as exc:  # botocore ClientError, connection errors, s3transfer errors
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelSourceError(f"cannot download {uri}: {exc}") from None
        try:
            _check_sha(uri, file_sha256(archive), expected_sha256)
        except ModelSourceError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return archive, folder

    def _unpack(self, archive: Path, folder: Path) -> Bundle:
        target = folder / "bundle"
        if target.exists():
            shutil.rmtree(target)
        unpack(archive, target)
        if archive.parent == folder:  # a download of ours: the unpacked copy is all that is needed
            archive.unlink(missing_ok=True)
        return read_bundle(target)

    def _forget(self, old: LoadedModel) -> None:
        """Free /tmp (512 MB by default) from a model that was swapped out."""
        for key in (old.sha256, old.location):
            folder = self._owned_dirs.pop(key, None) if key else None
            if folder is not None and folder.is_relative_to(self.settings.cache_dir):
                shutil.rmtree(folder, ignore_errors=True)


def _emit_fallback() -> None:
    """One ``ModelFallback`` data point (EMF, flushed now): the promoted model failed to load here."""
    with single_metric(name="ModelFallback", unit=MetricUnit.Count, value=1, namespace=METRICS_NAMESPACE,
                       default_dimensions={"service": SERVICE_NAME}):
        pass


def _check_sha(where: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise ModelSourceError(
            f"{where} has SHA-256 {actual[:12]}..., but the pointer says {expected[:12]}...; refusing to serve it"
        )


def _default_s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))
