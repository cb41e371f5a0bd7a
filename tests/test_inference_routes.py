"""The inference Lambda's routes with every accepted input, and parity with the evaluation path."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_inference_support import (
    api_event,
    call,
    dicom_bytes,
    gray,
    multipart_body,
    png_16bit,
    png_palette,
    png_rgba,
)

from shared.bundle import read_bundle
from shared.imaging import decode_image
from shared.predictor import OnnxPredictor

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish")


def assert_prediction(reply, bundle_version="test-tiny-0001"):
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) >= {"label", "probability", "probabilities", "threshold", "model"}
    assert set(body["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    p = body["probability"]
    assert 0.0 <= p <= 1.0
    assert body["probabilities"]["PNEUMONIA"] == p
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-9
    assert body["label"] == ("PNEUMONIA" if p >= body["threshold"] else "NORMAL")
    assert body["model"] == {"version": bundle_version, "trained_at": "2026-01-01T00:00:01Z"}
    return body


# -- page and health --------------------------------------------------------------------------------


def test_page_is_html_with_credit_notice_and_relative_urls(inference_app):
    reply = call(inference_app, api_event("GET", "/"))
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    html = reply.text
    assert "Kermany DS, Goldbaum M, Cai W, et al. Cell 2018; data CC BY 4.0" in html
    assert "Not a medical device" in html
    assert "predict?explain=1" in html and "x-api-key" in html and "localStorage" in html
    # Relative URLs only: the page works under a stage path such as /prod/.
    assert '"/predict' not in html and "'/predict" not in html and "http" not in html.split("<script>")[1]
    assert "<script src" not in html and "<link" not in html  # no build step, nothing fetched


def test_health_names_the_model_in_service(inference_app, tiny_bundle):
    reply = call(inference_app, api_event("GET", "/health"))
    assert reply.status == 200
    body = reply.json()
    assert body["status"] == "ok"
    model = body["model"]
    assert model["version"] == "test-tiny-0001"
    assert model["trained_at"] == "2026-01-01T00:00:01Z"
    assert model["threshold"] == 0.5
    assert model["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert model["source"] == "local"
    assert str(tiny_bundle) not in reply.text  # where the model lives stays in the logs


def test_cors_preflight_and_headers(inference_app):
    reply = call(inference_app, api_event("OPTIONS", "/predict", headers={
        "Origin": "https://example.org", "Access-Control-Request-Method": "POST"}))
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == "*"
    assert "x-api-key" in reply.headers["access-control-allow-headers"].lower()
    reply = call(inference_app, api_event("GET", "/health", headers={"Origin": "https://example.org"}))
    assert reply.headers["access-control-allow-origin"] == "*"


def test_handler_works_without_a_lambda_context(inference_app):
    raw = inference_app.handler(api_event("GET", "/health"))
    assert raw["statusCode"] == 200


# -- predict: every input kind ----------------------------------------------------------------------


def test_predict_each_full_size_original_raw_jpeg(inference_app, originals):
    for path in originals:
        assert_prediction(call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg")))


def test_predict_json_and_data_url(inference_app, originals):
    data = originals[0].read_bytes()
    b64 = base64.b64encode(data).decode()
    a = assert_prediction(call(inference_app, api_event(body=json.dumps({"image_base64": b64}),
                                                        content_type="application/json")))
    b = assert_prediction(call(inference_app, api_event(
        body=json.dumps({"image_base64": "data:image/jpeg;base64," + b64}), content_type="application/json; charset=utf-8")))
    # MIME-wrapped base64 (line breaks every 76 characters) is accepted too.
    wrapped = base64.encodebytes(data).decode()
    c = assert_prediction(call(inference_app, api_event(body=json.dumps({"image_base64": wrapped}),
                                                        content_type="application/json")))
    # API Gateway configured with */* as binary: the JSON arrives base64-encoded.
    d = assert_prediction(call(inference_app, api_event(body=json.dumps({"image_base64": b64}), base64_body=True,
                                                        content_type="application/json")))
    assert a["probability"] == b["probability"] == c["probability"] == d["probability"]


def test_predict_multipart(inference_app, originals):
    data = originals[3].read_bytes()
    body, ctype = multipart_body("file", "xray.jpeg", data, extra_fields={"note": "hello"})
    a = assert_prediction(call(inference_app, api_event(body=body, content_type=ctype)))
    # A browser that does not know the type: the file name and the bytes decide.
    body, ctype = multipart_body("file", "xray.jpg", data, content_type="application/octet-stream")
    b = assert_prediction(call(inference_app, api_event(body=body, content_type=ctype)))
    raw = assert_prediction(call(inference_app, api_event(body=data, content_type="image/jpeg")))
    assert a["probability"] == b["probability"] == raw["probability"]


def test_predict_png_variants(inference_app, originals):
    arr = gray(originals[1])
    base = assert_prediction(call(inference_app, api_event(body=_png(arr), content_type="image/png")))
    for data in (png_16bit(arr), png_palette(arr), png_rgba(arr)):
        body = assert_prediction(call(inference_app, api_event(body=data, content_type="image/png")))
        assert abs(body["probability"] - base["probability"]) < 0.05


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [8, 16])
def test_predict_dicom_from_originals(inference_app, originals, photometric, bits):
    for path in originals:
        arr = gray(path)
        data = dicom_bytes(arr, bits=bits, photometric=photometric)
        body = assert_prediction(call(inference_app, api_event(body=data, content_type="application/dicom")))
        # The DICOM shows the same picture as the JPEG it was made from; the JPEG itself is decoded
        # at a reduced DCT scale (shared.preprocessing.decode_min_side), the DICOM at full size.
        jpeg = call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg")).json()
        tolerance = 1e-3 if bits == 8 else 0.05
        assert abs(body["probability"] - jpeg["probability"]) <= tolerance


def test_dicom_decodes_to_the_source_picture(originals):
    arr = gray(originals[0])
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        decoded = decode_image(dicom_bytes(arr, bits=8, photometric=photometric), "dicom")
        assert np.array_equal(np.asarray(decoded.image), arr)
        decoded16 = decode_image(dicom_bytes(arr, bits=16, photometric=photometric), "dicom")
        assert np.abs(np.asarray(decoded16.image).astype(int) - arr).max() <= 1


def test_predict_dicom_with_voi_window_and_multipart(inference_app, originals):
    arr = gray(originals[0])
    data = dicom_bytes(arr, bits=16, window=(2048.0, 4096.0))
    body, ctype = multipart_body("file", "study.dcm", data, content_type="application/octet-stream")
    assert_prediction(call(inference_app, api_event(body=body, content_type=ctype)))


# -- explain ----------------------------------------------------------------------------------------


def test_explain_adds_a_heatmap_png_over_the_xray(inference_app, originals):
    path = originals[5]
    reply = call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg", query={"explain": "1"}))
    body = assert_prediction(reply)
    png = base64.b64decode(body["heatmap_png_base64"], validate=True)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    with Image.open(path) as src:
        w, h = src.size
    assert max(img.size) == 512 and abs(img.size[0] / img.size[1] - w / h) < 0.01
    rgb = np.asarray(img).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).any(), "the overlay should be coloured somewhere"
    plain = call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg")).json()
    assert "heatmap_png_base64" not in plain
    assert plain["probability"] == body["probability"]
    off = call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg", query={"explain": "0"}))
    assert "heatmap_png_base64" not in off.json()


@pytest.mark.parametrize("policy", ["stretch", "letterbox", "center_crop"])
def test_heatmap_follows_the_resize_policy(policy):
    from inference_lambda.heatmap import cam_in_image_frame
    from shared.preprocessing import PreprocessSpec

    spec = PreprocessSpec(size=64, resize=policy)
    cam = np.zeros((4, 4), np.float32)
    cam[:, 0] = 1.0  # evidence at the left edge of what the model saw
    heat = cam_in_image_frame(cam, spec, width=200, height=100)
    assert heat.shape == (100, 200)
    if policy == "stretch":
        assert heat[:, :20].mean() > 0.5 and heat[:, 100:].max() < 0.01
    elif policy == "letterbox":  # the padded square is 200 wide: its left edge is the image's left edge
        assert heat[:, :20].mean() > 0.5 and heat[:, 100:].max() < 0.01
    else:  # the central 100 x 100 square starts at x = 50
        assert heat[:, :45].max() == 0.0 and heat[:, 50:60].mean() > 0.5


# -- parity with the evaluation path ---------------------------------------------------------------


def test_probability_equals_evaluation_predictor_and_plain_onnxruntime(inference_app, tiny_bundle, originals):
    import onnxruntime as ort

    from shared.preprocessing import decode_min_side, preprocess, to_model_pixels

    bundle = read_bundle(tiny_bundle)
    predictor = OnnxPredictor(bundle)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    lambda_probs, pixels = [], []
    for path in originals:
        data = path.read_bytes()
        body = assert_prediction(call(inference_app, api_event(body=data, content_type="image/jpeg")))
        decoded = decode_image(data, "jpeg", decode_min_side(bundle.preprocessing))
        # The very call the evaluation command makes per image.
        assert body["probability"] == predictor.predict(decoded).probability
        # A direct onnxruntime run on shared.preprocessing output.
        logits = session.run(["logits"], {"image": preprocess(decoded.image, bundle.preprocessing)})[0]
        z = logits[0].astype(np.float64) / bundle.temperature
        direct = float(np.exp(z[1] - z.max()) / np.exp(z - z.max()).sum())
        assert abs(body["probability"] - direct) < 1e-6
        assert body["threshold"] == bundle.threshold
        lambda_probs.append(body["probability"])
        pixels.append(to_model_pixels(decoded.image, bundle.preprocessing))
    # Evaluation scores batches of model-sized pixels.
    batched = predictor.positive_probabilities(np.stack(pixels))
    assert np.allclose(batched, lambda_probs, atol=1e-6)


def test_probability_equals_the_evaluation_command(inference_app, tiny_bundle, originals, tmp_path):
    import csv

    from training_job.evaluate import evaluate

    evaluate(tiny_bundle, originals[0].parents[2], tmp_path)
    scored = {r["path"]: float(r["probability_pneumonia"]) for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    for path in originals:
        body = assert_prediction(call(inference_app, api_event(body=path.read_bytes(), content_type="image/jpeg")))
        assert abs(body["probability"] - scored[str(path)]) <= 1e-6  # the CSV keeps six decimals


def test_evaluation_command_names_skipped_files_missing_classes_and_bad_paths(tiny_bundle, originals, tmp_path, capsys):
    from training_job.evaluate import main

    data = tmp_path / "data"
    (data / "NORMAL").mkdir(parents=True)
    for path in originals:
        if path.parent.name == "NORMAL":
            (data / "NORMAL" / path.name).write_bytes(path.read_bytes())
    (data / "NORMAL" / "x.jpeg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["--bundle", str(tiny_bundle), "--data", str(data), "--out", str(out)]) == 0
    printed, errors = capsys.readouterr()
    assert f"skipped unreadable image {data / 'NORMAL' / 'x.jpeg'}: the body is text, not an image" in errors
    assert "3 images" in printed and "sensitivity n/a" in printed and "ROC AUC n/a" in printed
    assert "1 unreadable image skipped (no PNEUMONIA images: ROC AUC needs both classes)" in printed

    (tmp_path / "a-file").write_text("")
    for argv, message in [
        (["--bundle", str(tmp_path / "nope.tar.gz"), "--data", str(data)], f"bundle {tmp_path / 'nope.tar.gz'} does not exist"),
        (["--bundle", str(tiny_bundle), "--data", str(tmp_path / "nowhere")], f"data folder {tmp_path / 'nowhere'} does not exist"),
        (["--bundle", str(tiny_bundle), "--data", str(tmp_path), "--split", "bogus"], "has no bogus/ folder (--split)"),
        (["--bundle", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "a-file")],
         f"cannot write results to {tmp_path / 'a-file'}"),
    ]:
        assert main(argv + (["--out", str(out)] if "--out" not in argv else [])) == 1
        errors = capsys.readouterr().err
        assert errors.startswith("evaluation failed: ") and message in errors and len(errors.splitlines()) == 1, errors


def test_cors_with_several_origins_answers_the_callers_and_never_any(monkeypatch, tiny_bundle, tmp_path):
    import importlib

    from inference_lambda import app as app_module

    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("MODEL_LOAD_AT_INIT", "false")
    fresh = importlib.reload(app_module)
    try:
        for origin in ("https://a.example", "https://b.example"):
            reply = call(fresh, api_event("OPTIONS", "/predict", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST"}))
            assert reply.headers["access-control-allow-origin"] == origin
        reply = call(fresh, api_event("GET", "/", headers={"Origin": "https://evil.example"}))
        assert reply.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")
    finally:
        monkeypatch.delenv("CORS_ALLOW_ORIGINS")
        importlib.reload(app_module)


def test_page_key_is_required_forgettable_and_heatmap_has_a_viridis_legend(inference_app):
    import re

    from inference_lambda.heatmap import COLOURS, css_gradient

    html = call(inference_app, api_event("GET", "/")).text
    assert "required for predictions" in html and 'id="forget-key"' in html and "removeItem(KEY_STORE)" in html
    # The drop zone's accessible name is its visible text (WCAG 2.5.3), not a different label.
    assert 'aria-labelledby="drop-text"' in html and 'aria-label="Choose or drop' not in html
    assert "{{" not in html and css_gradient() in html and 'id="legend"' in html
    # The overlay paints with viridis: dark purple at no activation, yellow at the strongest.
    assert tuple(int(v) for v in COLOURS[0]) == (68, 1, 84) and tuple(int(v) for v in COLOURS[255]) == (253, 231, 37)
    assert re.search(r"rgb\(68, 1, 84\) 0%.*rgb\(253, 231, 37\) 100%", css_gradient())
