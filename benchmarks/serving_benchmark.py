"""Serving benchmark: the Lambda's ONNX Runtime path against the same network served with torch.

    .venv/bin/python benchmarks/serving_benchmark.py                 # ResNet-18 at 224 px, untrained
    .venv/bin/python benchmarks/serving_benchmark.py --bundle runs/x/model.tar.gz --warm 100

Measured in one run, on this machine:

1. **Cold start**: a fresh Python process that imports the serving code, loads the model and
   answers its first ``POST /predict`` with a full-size X-ray through ``inference_lambda.app.handler``.
   ONNX Runtime (the bundle's ``model.onnx``) against torch (a TorchScript module traced from
   ``training_job.models.ExportWrapper``, frozen, loaded with ``torch.jit.load``) serving through
   the very same handler, preprocessing and post-processing: only the network call differs.
2. **Warm latency**: p50 and p99 of ``--warm`` predictions of the predictor (``predict`` on a
   decoded X-ray: preprocessing from ``bundle.json``, network, calibration, threshold), which the
   target is about; the same through the whole handler path (base64, JPEG decoding, routing, logs,
   metrics, JSON), over the six full-size originals; the network call alone; and the extra cost of
   ``?explain=1`` (class activation map and PNG overlay).
3. **Installed size** of the serving dependencies (``inference_lambda/requirements.txt`` installed
   with pip into an empty folder) against the same dependencies with torch in place of ONNX
   Runtime: the CPU build (the ``torch-*+cpu`` wheel on this machine, installed the same way) and
   the CUDA build installed in ``.venv`` (measured from its installed files).

With ``--bundle`` the torch side is the bundle's architecture with random weights (latency does
not depend on the weights); without it both sides share the same weights. The table goes to
stdout and to ``benchmarks/results/serving.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGINALS = ROOT.parent / "shared" / "data" / "chest_xray_original_sample"
RESULTS = ROOT / "benchmarks" / "results" / "serving.md"
TARGETS = {"cold": 3.0, "warm": 2.0, "size_mb": 300.0}
RESULT_MARK = "BENCHMARK-RESULT "


# -- child processes: one backend, fresh interpreter ------------------------------------------------


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _events(explain: bool) -> list[dict]:
    import base64

    events = []
    for path in sorted(ORIGINALS.glob("train/*/*.jpeg")):
        events.append({
            "resource": "/{proxy+}", "path": "/predict", "httpMethod": "POST",
            "headers": {"Content-Type": "image/jpeg"}, "multiValueHeaders": {"Content-Type": ["image/jpeg"]},
            "queryStringParameters": {"explain": "1"} if explain else None,
            "multiValueQueryStringParameters": {"explain": ["1"]} if explain else None,
            "requestContext": {"requestId": "bench", "stage": "bench", "httpMethod": "POST", "path": "/bench/predict"},
            "body": base64.b64encode(path.read_bytes()).decode("ascii"), "isBase64Encoded": True,
        })
    return events


def _torch_predictor(bundle, module_path: str):
    """A predictor with OnnxPredictor's pre- and post-processing and a TorchScript network."""
    import torch

    from shared.predictor import OnnxPredictor
    from shared.preprocessing import normalize

    torch.set_num_threads(_threads())

    class TorchScriptPredictor(OnnxPredictor):
        def __init__(self):  # no ONNX Runtime session: the network is the TorchScript module
            self.bundle, self.spec = bundle, bundle.preprocessing
            self.ood = None  # see child(): both sides run without the refusal check
            self.module = torch.jit.load(module_path, map_location="cpu").eval()

        def run_pixels(self, pixels, with_features=False):
            with torch.inference_mode():
                logits, features = self.module(torch.from_numpy(normalize(pixels, self.spec)))
            return logits.numpy(), (features.numpy() if with_features else None)

    return TorchScriptPredictor()


def child(backend: str, phase: str, bundle_dir: str, module_path: str, warm: int) -> dict:
    t0 = time.perf_counter()
    os.environ.update({"MODEL_URI": bundle_dir, "MODEL_LOAD_AT_INIT": "0",
                       "POWERTOOLS_METRICS_NAMESPACE": "CxrBenchmark", "POWERTOOLS_LOG_LEVEL": "WARNING"})
    sys.path.insert(0, str(ROOT))
    out: dict = {}
    if backend == "torch":
        import torch  # noqa: F401 - timed with the imports, apart from loading the module
    from inference_lambda import app
    from inference_lambda.model_store import LoadedModel
    from shared.bundle import read_bundle

    out["import_app_s"] = time.perf_counter() - t0
    if backend == "onnx":
        model = app.store.get()
        # The torch side has random weights (only the ONNX form of the network ships), which the
        # out-of-distribution check would refuse: both sides run without it here, and
        # benchmarks/ood_benchmark.py measures what the check adds to a request.
        model.predictor.ood = None
    else:
        predictor = _torch_predictor(read_bundle(bundle_dir), module_path)
        model = LoadedModel(bundle=predictor.bundle, predictor=predictor, source="torchscript", location=module_path,
                            sha256=None, loaded_at="", load_seconds=0.0)
        app.store._model = model
    out["loaded_s"] = time.perf_counter() - t0
    plain = _events(explain=False)
    reply = app.handler(plain[-1], None)
    assert reply["statusCode"] == 200, reply
    out["first_prediction_s"] = time.perf_counter() - t0
    out["probability"] = json.loads(reply["body"])["probability"]
    if phase == "warm":
        explained = _events(explain=True)
        for ev in plain + explained:  # warm-up: caches, allocator, thread pools
            app.handler(ev, None)
        for name, events in (("plain_ms", plain), ("explain_ms", explained)):
            times, cpu = [], []
            for i in range(warm):
                s, c = time.perf_counter(), time.process_time()
                r = app.handler(events[i % len(events)], None)
                times.append((time.perf_counter() - s) * 1000.0)
                cpu.append((time.process_time() - c) * 1000.0)
                assert r["statusCode"] == 200
            out[name], out[name.replace("_ms", "_cpu_ms")] = times, cpu
        import numpy as np

        from shared.imaging import decode_image
        from shared.preprocessing import decode_min_side

        # The predictor: what the handler calls once the upload is decoded (preprocessing read from
        # bundle.json, the network, temperature, threshold and label).
        min_side = decode_min_side(model.bundle.preprocessing)
        blobs = [p.read_bytes() for p in sorted(ORIGINALS.glob("train/*/*.jpeg"))]
        images = [decode_image(b, "jpeg", min_side) for b in blobs]
        times = []
        for i in range(warm):  # the handler's JPEG decoding, the same code on both sides
            s = time.perf_counter()
            decode_image(blobs[i % len(blobs)], "jpeg", min_side)
            times.append((time.perf_counter() - s) * 1000.0)
        out["decode_ms"] = times
        out["jpeg_kb"] = [len(b) / 1000.0 for b in blobs]
        for image in images:
            model.predictor.predict(image)
        times = []
        for i in range(warm):
            s = time.perf_counter()
            model.predictor.predict(images[i % len(images)])
            times.append((time.perf_counter() - s) * 1000.0)
        out["predictor_ms"] = times
        pixels = np.full((model.bundle.preprocessing.size,) * 2, 128, dtype=np.uint8)
        times = []
        for _ in range(warm):
            s = time.perf_counter()
            model.predictor.run_pixels(pixels)
            times.append((time.perf_counter() - s) * 1000.0)
        out["network_ms"] = times
    return out


def run_child(backend: str, phase: str, bundle_dir: Path, module_path: Path, warm: int) -> dict:
    env = dict(os.environ)
    if backend == "torch":
        # The serving session does not spin-wait (OnnxPredictor(spin_wait=False)); torch's OpenMP
        # threads get the same treatment.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--phase", phase,
           "--bundle", str(bundle_dir), "--torchscript", str(module_path), "--warm", str(warm)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{backend}/{phase} child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["process_wall_s"] = wall
    return result


# -- artifacts ------------------------------------------------------------------------------------


def build_artifacts(work: Path, bundle_arg: str | None) -> tuple[Path, Path, dict]:
    """A bundle folder and a TorchScript file of the same network."""
    import torch

    from shared.bundle import read_bundle
    from shared.preprocessing import PreprocessSpec
    from training_job.export import write_model_bundle
    from training_job.models import ExportWrapper, build_model, with_test_time_views

    torch.manual_seed(0)
    if bundle_arg:
        bundle = read_bundle(bundle_arg, unpack_to=work / "bundle")
        spec = bundle.preprocessing
        arch = bundle.meta.get("architecture", "resnet18")
        hp = bundle.meta.get("provenance", {}).get("hyperparameters", {})
        model = build_model(arch, in_channels=spec.channels, width=int(hp.get("width", 0) or 0),
                            image_size=spec.size).eval()
        views = bundle.meta["onnx"].get("test_time_views") or {}
        # The same test-time views as the bundle's graph, so both sides run the same passes per image.
        model = with_test_time_views(model, spec.size, views.get("hflip", False), views.get("zoom_out", ())).eval()
        info = {"bundle": bundle_arg, "torch_weights": "random (same architecture)",
                "views": getattr(model, "n_views", 1)}
    else:
        spec = PreprocessSpec(size=224, channels=1)
        arch = "resnet18"
        model = build_model(arch, in_channels=1).eval()
        write_model_bundle(
            model, spec, work / "bundle", model_version="bench-resnet18-224", threshold=0.5, temperature=1.0,
            architecture=arch, validation_metrics={},
            provenance={"dataset": {}, "hyperparameters": {}, "code_version": "benchmark",
                        "started_at": "", "finished_at": "", "device": "cpu"})
        bundle = read_bundle(work / "bundle")
        info = {"bundle": "built here: untrained resnet18, 224 px, 1 channel", "torch_weights": "the bundle's"}
    example = torch.randn(1, spec.channels, spec.size, spec.size)
    ts_path = work / "model.torchscript.pt"
    with torch.no_grad():
        traced = torch.jit.trace(ExportWrapper(model).eval(), example)
        try:  # constants folded: torch's own inference form that still saves and loads
            frozen = torch.jit.freeze(traced)
            torch.jit.save(frozen, str(ts_path))
            torch.jit.load(str(ts_path))
            info["torchscript"] = "traced and frozen"
        except Exception as exc:  # noqa: BLE001 - the plain trace still measures torch
            torch.jit.save(traced, str(ts_path))
            info["torchscript"] = f"traced ({type(exc).__name__} when freezing)"
    info.update({"architecture": arch, "input": f"{spec.size} px, {spec.channels} channel(s)",
                 "onnx_mb": bundle.onnx_path.stat().st_size / 1e6, "torchscript_mb": ts_path.stat().st_size / 1e6})
    return bundle.root, ts_path, info


# -- installed sizes --------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def dist_sizes(site: Path) -> dict[str, int]:
    from importlib.metadata import distributions

    sizes = {}
    for dist in distributions(path=[str(site)]):
        total = 0
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
        sizes[dist.metadata["Name"].lower().replace("_", "-")] = total
    return sizes


def pip_target(target: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--only-binary=:all:", "--target", str(target), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def venv_closure_bytes(root_name: str) -> tuple[int, list[str], str]:
    """Bytes of a distribution installed in this environment and everything it requires."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    todo = [root_name]
    version = distribution(root_name).version
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = sum(Path(dist.locate_file(f)).stat().st_size for f in (dist.files or [])
                         if Path(dist.locate_file(f)).is_file())
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return sum(seen.values()), sorted(seen), version


def measure_sizes(work: Path) -> dict:
    req = ROOT / "inference_lambda" / "requirements.txt"
    pins = [ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    out: dict = {}
    serve = work / "serve-deps"
    pip_target(serve, ["-r", str(req)])
    out["serve_bytes"] = tree_bytes(serve)
    sizes = dist_sizes(serve)
    out["serve_top"] = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
    # What only ONNX Runtime brings: itself and the packages nothing else in the image needs.
    ort_only = {"onnxruntime", "flatbuffers", "protobuf", "coloredlogs", "humanfriendly", "sympy", "mpmath"}
    out["ort_bytes"] = sum(v for k, v in sizes.items() if k in ort_only)
    without_ort = out["serve_bytes"] - out["ort_bytes"]

    wheels = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
    if wheels:
        tserve = work / "torch-cpu-serve"
        others = [p for p in pins if not p.startswith("onnxruntime")]
        pip_target(tserve, [str(wheels[-1]), *others])
        out["torch_cpu_serve_bytes"] = tree_bytes(tserve)
        out["torch_cpu_wheel"] = wheels[-1].name
        out["torch_cpu_site"] = str(tserve)
    closure, names, version = venv_closure_bytes("torch")
    import torch

    out["torch_venv_version"] = version
    out["torch_venv_build"] = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    out["torch_venv_closure_bytes"] = closure
    out["torch_venv_closure"] = names
    out["torch_cuda_serve_bytes"] = without_ort + closure
    return out


# -- report ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt_ratio(value: float) -> str:
    return f"{value:.1f}x"


def report(info: dict, cold: dict, warm: dict, sizes: dict | None, args) -> str:
    mb = 1e6
    lines = ["# Serving benchmark: ONNX Runtime vs torch", "",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             f"`.venv/bin/python benchmarks/serving_benchmark.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
             "", f"Machine: {platform.processor() or platform.machine()}, {_threads()} CPU cores available "
             f"(shared with other work: load average {info['load_before']:.1f} before, {os.getloadavg()[0]:.1f} after), "
             f"Python {platform.python_version()}, "
             f"onnxruntime {info['ort_version']}, torch {info['torch_version']}.",
             f"Model: {info['architecture']}, {info['input']}; {info['bundle']}. model.onnx {info['onnx_mb']:.1f} MB, "
             f"TorchScript {info['torchscript_mb']:.1f} MB ({info['torchscript']}; weights: {info['torch_weights']})"
             + (f"; both run the bundle's {info['views']} test-time views per image (network passes)."
                if info.get("views", 1) > 1 else "."),
             "Both sides run the same code (`inference_lambda.app.handler`, `shared.predictor.OnnxPredictor`'s "
             f"preprocessing and post-processing), {_threads()} intra-op threads each; only the network call differs.",
             "",
             "| measure | ONNX Runtime (the Lambda) | torch (TorchScript) | torch / ONNX | target | met |",
             "|---|---:|---:|---:|---|---|"]
    c_o, c_t = statistics.median(cold["onnx"]), statistics.median(cold["torch"])
    lines.append(f"| cold start: new process to first answer, median of {args.cold} (s) | {c_o:.2f} | {c_t:.2f} | "
                 f"{fmt_ratio(c_t / c_o)} | >= {TARGETS['cold']:.0f}x faster | {'yes' if c_t / c_o >= TARGETS['cold'] else 'no'} |")
    for key, label in (("import_app_s", "of which imports (s)"), ("loaded_s", "of which imports and model load (s)")):
        lines.append(f"| {label}, median | {statistics.median(cold[key + '_onnx']):.2f} | "
                     f"{statistics.median(cold[key + '_torch']):.2f} | | | |")
    w = {b: {k: (pct(warm[b][k], 0.5), pct(warm[b][k], 0.99))
             for k in ("plain_ms", "explain_ms", "predictor_ms", "network_ms", "decode_ms", "plain_cpu_ms")}
         for b in ("onnx", "torch")}
    p50_ratio = w["torch"]["predictor_ms"][0] / w["onnx"]["predictor_ms"][0]
    handler_ratio = w["torch"]["plain_ms"][0] / w["onnx"]["plain_ms"][0]
    lines += [
        f"| warm p50 of the predictor: preprocessing, network, calibration and label, "
        f"{len(warm['onnx']['predictor_ms'])} predictions (ms) | {w['onnx']['predictor_ms'][0]:.2f} | "
        f"{w['torch']['predictor_ms'][0]:.2f} | {fmt_ratio(p50_ratio)} | >= {TARGETS['warm']:.0f}x faster | "
        f"{'yes' if p50_ratio >= TARGETS['warm'] else 'no'} |",
        f"| warm p99 of the predictor (ms) | {w['onnx']['predictor_ms'][1]:.2f} | {w['torch']['predictor_ms'][1]:.2f} | "
        f"{fmt_ratio(w['torch']['predictor_ms'][1] / w['onnx']['predictor_ms'][1])} | | |",
        f"| warm p50 through the whole handler: base64, JPEG decoding, routing, logs, metrics, JSON on top, "
        f"{len(warm['onnx']['plain_ms'])} requests (ms) | {w['onnx']['plain_ms'][0]:.1f} | "
        f"{w['torch']['plain_ms'][0]:.1f} | {fmt_ratio(handler_ratio)} | | |",
        f"| warm p99 through the whole handler (ms) | {w['onnx']['plain_ms'][1]:.1f} | {w['torch']['plain_ms'][1]:.1f} | "
        f"{fmt_ratio(w['torch']['plain_ms'][1] / w['onnx']['plain_ms'][1])} | | |",
        f"| CPU time per request through the handler, all threads, p50 (ms) | {w['onnx']['plain_cpu_ms'][0]:.1f} | "
        f"{w['torch']['plain_cpu_ms'][0]:.1f} | {fmt_ratio(w['torch']['plain_cpu_ms'][0] / w['onnx']['plain_cpu_ms'][0])} "
        "| | |",
        f"| network call alone, p50 (ms) | {w['onnx']['network_ms'][0]:.1f} | {w['torch']['network_ms'][0]:.1f} | "
        f"{fmt_ratio(w['torch']['network_ms'][0] / w['onnx']['network_ms'][0])} | | |",
        f"| JPEG decoding alone (same code on both sides), p50 (ms) | {w['onnx']['decode_ms'][0]:.1f} | "
        f"{w['torch']['decode_ms'][0]:.1f} | | | |",
        f"| `?explain=1` p50 through the handler (ms) | {w['onnx']['explain_ms'][0]:.1f} | "
        f"{w['torch']['explain_ms'][0]:.1f} | | | |",
        f"| heatmap's extra cost, p50 explain minus p50 plain (ms) | "
        f"{w['onnx']['explain_ms'][0] - w['onnx']['plain_ms'][0]:.1f} | "
        f"{w['torch']['explain_ms'][0] - w['torch']['plain_ms'][0]:.1f} | | | |",
    ]
    if sizes:
        s_o = sizes["serve_bytes"] / mb
        met = "yes" if s_o <= TARGETS["size_mb"] else "no"
        if "torch_cpu_serve_bytes" in sizes:
            s_c = sizes["torch_cpu_serve_bytes"] / mb
            lines.append(f"| serve dependencies installed (MB), torch CPU build | {s_o:.0f} | {s_c:.0f} | "
                         f"{fmt_ratio(s_c / s_o)} | <= {TARGETS['size_mb']:.0f} MB | {met} |")
        s_g = sizes["torch_cuda_serve_bytes"] / mb
        lines.append(f"| serve dependencies installed (MB), torch as in .venv ({sizes['torch_venv_build']}) | "
                     f"{s_o:.0f} | {s_g:.0f} | {fmt_ratio(s_g / s_o)} | <= {TARGETS['size_mb']:.0f} MB | {met} |")
    cpu_ratio = w["torch"]["plain_cpu_ms"][0] / w["onnx"]["plain_cpu_ms"][0]
    net_ratio = w["torch"]["network_ms"][0] / w["onnx"]["network_ms"][0]
    lines += ["", "Findings:", ""]
    lines.append(f"- Cold start: {'meets' if c_t / c_o >= TARGETS['cold'] else 'misses'} the {TARGETS['cold']:.0f}x "
                 f"target ({c_t / c_o:.1f}x). Most of torch's cost is importing it "
                 f"({statistics.median(cold['import_app_s_torch']):.1f} s of imports against "
                 f"{statistics.median(cold['import_app_s_onnx']):.1f} s, before any model is read).")
    common = statistics.median([w[b]["plain_ms"][0] - w[b]["predictor_ms"][0] for b in ("onnx", "torch")])
    decode_ms = pct(warm["onnx"]["decode_ms"] + warm["torch"]["decode_ms"], 0.5)
    lines.append(f"- Warm latency: {'meets' if p50_ratio >= TARGETS['warm'] else 'misses'} the {TARGETS['warm']:.0f}x "
                 f"target for the predictor ({p50_ratio:.1f}x at p50; the network call alone {net_ratio:.1f}x). "
                 f"Through the whole handler the ratio is {handler_ratio:.1f}x: both sides spend about {common:.1f} ms "
                 f"per request outside the predictor, mostly decoding the JPEG (p50 {decode_ms:.1f} ms for the "
                 f"{min(warm['jpeg_kb']):.0f}-{max(warm['jpeg_kb']):.0f} KB full-size X-rays), which is the same code on "
                 f"both sides. CPU time per request through the handler: {cpu_ratio:.1f}x.")
    if sizes:
        lines.append(f"- Size: {sizes['serve_bytes'] / mb:.0f} MB of dependencies "
                     f"({'within' if sizes['serve_bytes'] / mb <= TARGETS['size_mb'] else 'over'} the "
                     f"{TARGETS['size_mb']:.0f} MB target) against "
                     + (f"{sizes['torch_cpu_serve_bytes'] / mb:.0f} MB with torch's CPU build and " if
                        'torch_cpu_serve_bytes' in sizes else "")
                     + f"{sizes['torch_cuda_serve_bytes'] / 1e9:.1f} GB with the CUDA build this machine has.")
    lines += ["", "Notes:", ""]
    lines.append(f"- Probability of the first answer: ONNX {cold['prob_onnx']:.6f}, torch {cold['prob_torch']:.6f} "
                 "(same weights unless `--bundle` was given).")
    lines.append("- Both sides run without the out-of-distribution check (the torch side's random weights would be "
                 "refused); `benchmarks/ood_benchmark.py` measures what the check adds (`ood.md`).")
    lines.append("- Cold start is the wall time of a fresh `python` process: interpreter start, imports, model "
                 "load (ONNX Runtime session or `torch.jit.load`), and one full-size X-ray through the handler. "
                 "In Lambda the image's own start-up (container pull, runtime init) comes on top for both.")
    lines.append("- CPU time (`time.process_time`, summed over the process's threads) is the work a request costs; "
                 "unlike wall time it hardly moves with the machine's background load.")
    lines.append(f"- Warm figures cycle over the six full-size originals (1,040 to 1,784 px wide), in {args.rounds} "
                 "alternating rounds of fresh processes per backend after a warm-up. The predictor gets each original "
                 "decoded as the handler decodes it (the smallest JPEG DCT scale that keeps the model's size), so its "
                 "time includes resizing that image to the model's input. Neither side spin-waits: "
                 "ONNX Runtime's `session.intra_op.allow_spinning=0` (as served), torch with `OMP_WAIT_POLICY=PASSIVE`.")
    if sizes:
        top = ", ".join(f"{k} {v / mb:.0f}" for k, v in sizes["serve_top"])
        lines.append(f"- Serve dependencies: `pip install --target` of `inference_lambda/requirements.txt` into an "
                     f"empty folder, apparent size of all files (CPython {platform.python_version()} wheels; the "
                     f"image's 3.12 wheels are within a few MB). Largest (MB): {top}. ONNX Runtime's own share: "
                     f"{sizes['ort_bytes'] / mb:.0f} MB.")
        if "torch_cpu_serve_bytes" in sizes:
            lines.append(f"- torch CPU build: the same requirements with onnxruntime replaced by "
                         f"`{sizes['torch_cpu_wheel']}` (the CPU wheel on this machine; torch==2.14.1's CPU wheel "
                         "is not on PyPI's default index), installed the same way.")
        lines.append(f"- torch as installed in `.venv`: {sizes['torch_venv_version']} ({sizes['torch_venv_build']}), "
                     f"{sizes['torch_venv_closure_bytes'] / 1e9:.2f} GB with its requirements "
                     f"({len(sizes['torch_venv_closure'])} distributions, the nvidia-* CUDA libraries and triton "
                     "among them), plus the serve dependencies other than ONNX Runtime.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle folder or model.tar.gz (default: build an untrained resnet18 at 224 px)")
    ap.add_argument("--warm", type=int, default=200, help="timed predictions per backend and mode (default 200)")
    ap.add_argument("--cold", type=int, default=3, help="fresh processes per backend (default 3)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating warm rounds per backend (default 4)")
    ap.add_argument("--skip-size", action="store_true", help="skip the pip installs that measure dependency sizes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=["onnx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["cold", "warm"], help=argparse.SUPPRESS)
    ap.add_argument("--torchscript", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = child(args.child, args.phase, args.bundle, args.torchscript, args.warm)
        print(RESULT_MARK + json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    load_before = os.getloadavg()[0]
    try:
        print("building the bundle and the TorchScript module ...", file=sys.stderr)
        bundle_dir, ts_path, info = build_artifacts(work, args.bundle)
        import onnxruntime
        import torch

        info["ort_version"], info["torch_version"] = onnxruntime.__version__, torch.__version__
        info["load_before"] = load_before
        cold: dict = {"onnx": [], "torch": []}
        for i in range(args.cold):  # interleaved, so background load hits both alike
            for backend in ("onnx", "torch"):
                print(f"cold start {i + 1}/{args.cold}: {backend}", file=sys.stderr)
                r = run_child(backend, "cold", bundle_dir, ts_path, args.warm)
                cold[backend].append(r["process_wall_s"])
                for key in ("import_app_s", "loaded_s"):
                    cold.setdefault(f"{key}_{backend}", []).append(r[key])
                cold[f"prob_{backend}"] = r["probability"]
        # Warm requests in alternating rounds of fresh processes: the machine's background load
        # changes by the minute, and each backend should meet the same share of it.
        warm: dict = {"onnx": {}, "torch": {}}
        per_round = max(1, args.warm // args.rounds)
        for i in range(args.rounds):
            for backend in ("onnx", "torch"):
                print(f"warm round {i + 1}/{args.rounds}: {backend}, {per_round} x 2 requests", file=sys.stderr)
                r = run_child(backend, "warm", bundle_dir, ts_path, per_round)
                for key in ("plain_ms", "explain_ms", "predictor_ms", "network_ms", "decode_ms", "plain_cpu_ms"):
                    warm[backend].setdefault(key, []).extend(r[key])
                warm["jpeg_kb"] = r["jpeg_kb"]
        sizes = None
        if not args.skip_size:
            print("installed sizes (pip install --target) ...", file=sys.stderr)
            sizes = measure_sizes(work)
        text = report(info, cold, warm, sizes, args)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
