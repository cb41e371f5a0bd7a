"""The container Lambda that serves the promoted model over API Gateway (contract 5).

- :mod:`inference_lambda.app`: the handler (``inference_lambda.app.handler``), routes, logs, metrics.
- :mod:`inference_lambda.model_store`: which model is in service, where it came from, when it changes.
- :mod:`inference_lambda.inputs`: request body -> image bytes (raw, JSON, multipart) with size limits.
- :mod:`inference_lambda.heatmap`: the class activation map drawn over the X-ray as a PNG.

Nothing here imports torch: the image holds ONNX Runtime, numpy, Pillow and pydicom only.
"""
