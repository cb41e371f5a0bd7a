"""The inference Lambda: API Gateway REST (proxy integration) -> ONNX Runtime (contract 5).

Handler: ``inference_lambda.app.handler``.

Routes
    ``POST /predict``  raw ``image/jpeg`` / ``image/png`` / ``application/dicom`` body, JSON
                       ``{"image_base64": ...}``, or a multipart form field ``file``;
                       ``?explain=1`` adds ``heatmap_png_base64``.
    ``GET /health``    the model in service and the out-of-distribution check's cut-offs.

``POST /predict`` answers 422 ``not_a_chest_xray`` (no label, probability or heatmap) for an input
that is not a frontal chest X-ray: DICOM header rules first, then the bundle's pixel check
(``shared/ood.py``); an accepted answer carries ``ood_score``/``ood_cutoff`` and
``view_probability``/``view_cutoff``.
    ``GET /``          the upload page.

The model is loaded during the init phase when ``MODEL_URI`` is set (``MODEL_LOAD_AT_INIT``,
default on), so a cold start's first request finds the ONNX Runtime session ready; if that load
fails the function still starts, answers 503 with ``Retry-After``, and tries again on a later
request. See :mod:`inference_lambda.model_store` for the ``MODEL_URI`` forms.

Logs are structured JSON (Powertools Logger) and never carry request bodies, image bytes or
DICOM tags: only sizes, formats, dimensions, outcomes and timings. Metrics are CloudWatch EMF.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pybase64
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, CORSConfig, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from shared.api import CORS_ALLOW_HEADERS, CORS_MAX_AGE_SECONDS, ROUTES
from shared.imaging import ImageError, decode_image
from shared.ood import CODE as NOT_A_CHEST_XRAY
from shared.ood import UNAVAILABLE as OOD_UNAVAILABLE
from shared.predictor import class_activation_map
from shared.preprocessing import decode_min_side

from . import dicom_results
from .config import METRICS_NAMESPACE, SERVICE_NAME, Settings
from .errors import ApiError, BadRequest, MethodNotAllowed, ModelUnavailable, NotFound, error_body
from .heatmap import DISPLAY_MAX_SIDE, css_gradient, overlay_png
from .inputs import extract_image, printable
from .model_store import ModelStore

PAGE_PATH = Path(__file__).resolve().parent / "static" / "index.html"
# The heatmap legend on the page is drawn with the colours heatmap.py paints with.
PAGE = PAGE_PATH.read_text(encoding="utf-8").replace("{{HEATMAP_GRADIENT}}", css_gradient())
HTML = "text/html; charset=utf-8"
_TRUE = ("1", "true", "yes", "on")

logger = Logger(service=SERVICE_NAME)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
settings = Settings.from_env()
store = ModelStore(settings)

app = APIGatewayRestResolver(
    # Several origins: Powertools answers the request's Origin when it is one of them, never "*".
    cors=CORSConfig(allow_origin=settings.cors_allow_origins[0], extra_origins=list(settings.cors_allow_origins[1:]),
                    allow_headers=list(CORS_ALLOW_HEADERS), max_age=CORS_MAX_AGE_SECONDS),
    # Explicit: the resolver's debug mode (also switchable by env) prints whole events, bodies included.
    debug=False,
)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON,
                    body=json.dumps(body, allow_nan=False), headers={"Cache-Control": "no-store", **(headers or {})})


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, error_body(code, message), headers)


# -- routes ---------------------------------------------------------------------------------------


@app.get("/")
def page() -> Response:
    return Response(status_code=200, content_type=HTML, body=PAGE, headers={"Cache-Control": "public, max-age=300"})


@app.get("/health")
def health() -> Response:
    model = store.get()
    ood = model.predictor.ood
    check = ood.public() if ood is not None else OOD_UNAVAILABLE
    fallback = store.fallback()
    if fallback is None:
        return _json(200, {"status": "ok", "model": model.public(), "ood_check": check})
    # Still 200: a model answers. The fallback says which promoted model it stands in for.
    return _json(200, {"status": "fallback", "model": model.public(), "fallback": fallback, "ood_check": check})


@app.post("/predict")
def predict() -> Response:
    started = time.perf_counter()
    event = app.current_event
    explain = (event.query_string_parameters or {}).get("explain", "").strip().lower() in _TRUE
    answer = dicom_results.requested(event.headers.get("accept"))  # None: JSON
    # The input is checked before the model is asked for, so bad input gets its 4xx even while
    # the model is unavailable.
    payload = extract_image(event.body, bool(event.is_base64_encoded), event.headers.get("content-type"))
    try:
        model = store.get()
    except ModelUnavailable:
        decode_image(payload.data, payload.declared_format)  # a bad image still gets its 4xx first
        raise
    decoded = decode_image(payload.data, payload.declared_format, decode_min_side(model.bundle.preprocessing))
    if answer and decoded.format != "dicom":
        raise dicom_results.refuse_non_dicom(decoded.format)
    explain = explain or answer == dicom_results.SR_AND_HEATMAP

    t0 = time.perf_counter()
    # Raises NotAChestXray (422 not_a_chest_xray, no label or probability) for an image the bundle's
    # out-of-distribution check refuses.
    prediction = model.predictor.predict(decoded, with_features=explain)
    inference_ms = (time.perf_counter() - t0) * 1000.0
    bundle = model.bundle
    body: dict[str, Any] = {
        "label": prediction.label,
        "probability": prediction.probability,
        "probabilities": prediction.probabilities,
        "threshold": prediction.threshold,
        "model": {"version": bundle.version, "trained_at": bundle.trained_at},
    }
    if prediction.verdict is not None:  # how typical the image was: ood_score <= ood_cutoff, view_probability >= view_cutoff
        body.update(prediction.verdict.public())
    heatmap_ms, png = 0.0, None
    if explain:
        t1 = time.perf_counter()
        cam = class_activation_map(bundle, prediction.features, bundle.class_names.index(prediction.label))
        # The overlay wants more pixels than the network: decode again at display size.
        display = decode_image(payload.data, payload.declared_format, DISPLAY_MAX_SIDE)
        png = overlay_png(display.image, cam, bundle.preprocessing)
        body["heatmap_png_base64"] = pybase64.b64encode(png).decode("ascii")
        heatmap_ms = (time.perf_counter() - t1) * 1000.0
    latency_ms = (time.perf_counter() - started) * 1000.0

    metrics.add_metric(name="Predictions", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="PredictionLatency", unit=MetricUnit.Milliseconds, value=latency_ms)
    metrics.add_metric(name="InferenceLatency", unit=MetricUnit.Milliseconds, value=inference_ms)
    if explain:
        metrics.add_metric(name="HeatmapLatency", unit=MetricUnit.Milliseconds, value=heatmap_ms)
    # The label is a dimension of its own metric, so it does not split the other metrics by label.
    with single_metric(name="PredictionsByLabel", unit=MetricUnit.Count, value=1, namespace=METRICS_NAMESPACE,
                       default_dimensions={"service": SERVICE_NAME}) as by_label:
        by_label.add_dimension(name="label", value=prediction.label)
    logger.info("prediction", extra={
        "label": prediction.label, "probability": round(prediction.probability, 6),
        "threshold": prediction.threshold, "model_version": bundle.version,
        "ood_score": round(prediction.verdict.score, 3) if prediction.verdict else None,
        "input": {"kind": payload.kind, "format": decoded.format, "bytes": len(payload.data),
                  "width": decoded.width, "height": decoded.height},
        "explain": explain, "latency_ms": round(latency_ms, 2), "inference_ms": round(inference_ms, 2),
        "heatmap_ms": round(heatmap_ms, 2), "answer": answer or "json",
    })
    if answer:
        return _dicom(answer, payload.data, model, prediction, png)
    return _json(200, body)


def _dicom(answer: str, data: bytes, model: Any, prediction: Any, png: bytes | None) -> Response:
    bundle = model.bundle
    result = dicom_results.Result(
        pneumonia=prediction.label == bundle.class_names[bundle.positive_index], probability=prediction.probability,
        threshold=prediction.threshold, model_name=f"{SERVICE_NAME} {bundle.meta.get('architecture') or 'model'}",
        model_version=bundle.version, archive_sha256=model.sha256)
    objects = dicom_results.result_objects(data, result, png if answer == dicom_results.SR_AND_HEATMAP else None)
    payload, media = dicom_results.response_body(answer, objects)
    return Response(status_code=200, content_type=media, body=payload, headers={"Cache-Control": "no-store"})


# -- errors ---------------------------------------------------------------------------------------


@app.not_found
def not_found(_exc: Exception) -> Response:
    event = app.current_event
    path = event.path.rstrip("/") or "/"
    allowed = ROUTES.get(path)
    if allowed:
        err: ApiError = MethodNotAllowed(f"{event.http_method} is not allowed on {path}; use {', '.join(allowed)}",
                                         headers={"Allow": ", ".join(allowed)})
    else:
        err = NotFound(f"no route '{printable(path[:100])}'; the routes are {', '.join(f'{m} {p}' for p, ms in ROUTES.items() for m in ms)}")
    return _rejected(err.http_status, err.code, err.message, err.headers)


@app.exception_handler(ApiError)
def on_api_error(exc: ApiError) -> Response:
    return _rejected(exc.http_status, exc.code, exc.message, exc.headers)


@app.exception_handler(ImageError)
def on_image_error(exc: ImageError) -> Response:
    return _rejected(exc.http_status, exc.code, exc.message)


@app.exception_handler(Exception)
def on_unexpected(exc: Exception) -> Response:
    # The type and the traceback (which holds code locations, not request data) are enough to debug.
    logger.exception("unexpected error", extra={"error_type": type(exc).__name__})
    metrics.add_metric(name="ServerErrors", unit=MetricUnit.Count, value=1)
    return _error(500, "internal_error", "the request could not be processed; try again later")


def _rejected(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    level = logger.warning if status >= 500 else logger.info
    level("request rejected", extra={"status": status, "code": code, "reason": message})
    metrics.add_metric(name="ModelUnavailable" if status == 503 else "RejectedRequests",
                       unit=MetricUnit.Count, value=1)
    if code == NOT_A_CHEST_XRAY:
        metrics.add_metric(name="RejectedNotChestXray", unit=MetricUnit.Count, value=1)
    return _error(status, code, message, headers)


# -- entry point ----------------------------------------------------------------------------------


class LocalContext:
    """The parts of a Lambda context that logging and metrics read, for callers outside Lambda."""

    function_name = SERVICE_NAME
    function_version = "$LATEST"
    memory_limit_in_mb = 0
    invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{SERVICE_NAME}"
    log_group_name = log_stream_name = "local"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


@metrics.log_metrics(capture_cold_start_metric=True)
@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST, log_event=False,
                              clear_state=True)
def _handle(event: dict, context: Any) -> dict:
    if not isinstance(event, dict) or "httpMethod" not in event:
        raise BadRequest("not an API Gateway REST proxy event")
    return app.resolve(event, context)


def handler(event: dict, context: Any = None) -> dict:
    """Lambda entry point; ``context`` may be omitted when called outside Lambda (local twin, tests)."""
    try:
        return _handle(event, context if context is not None else LocalContext())
    except BadRequest as exc:
        return {"statusCode": 400, "headers": {"Content-Type": content_types.APPLICATION_JSON},
                "body": json.dumps(error_body(exc.code, exc.message)), "isBase64Encoded": False}


if settings.load_at_init and settings.model_uri:
    store.warm_up()
