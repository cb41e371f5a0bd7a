"""``python -m infra.twin``: the whole flow on this machine, then the API until Ctrl-C.

1. start S3 (SeaweedFS) and the control plane (moto) on 127.0.0.1, and the local API in front of
   the inference handler; the model in service is the promoted one, else the shipped reference;
2. upload the dataset (``--data``) with the upload command, ``_READY`` marker last;
3. the marker's S3 event goes through the trigger to one run of the pipeline (validate, train,
   gate, register, promote or not, notify); an unchanged marker starts nothing;
4. print the URL, the API key, which model serves and why, and a prediction for a real X-ray
   made through the API; with ``--once`` stop there, else keep serving (and start a run for any
   new marker uploaded to the twin's S3) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shared.cli import TRUE_WORDS, HelpFormatter, add_bool
from shared.dataset import DatasetLayoutError

from .trigger import MarkerWatcher
from .twin import (
    DEFAULT_DATA,
    KAGGLE_HINT,
    RECIPES,
    REFERENCE_MODEL,
    STATE_DIR,
    RunReport,
    Twin,
    TwinOptions,
    sample_image,
)

WATCH_INTERVAL = 2.0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.twin",
                                description="Run the whole flow on this machine (S3, the training pipeline, the "
                                            "API on 127.0.0.1), then serve the API until Ctrl-C.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help=f"dataset root with train/{{NORMAL,PNEUMONIA}} (Kaggle chest_xray layout); default: {DEFAULT_DATA}")
    p.add_argument("--dataset-name", help="name under datasets/ in the data bucket; default: the folder's name")
    p.add_argument("--port", type=int, default=0, help="the local API's port on 127.0.0.1; 0 picks a free one")
    p.add_argument("--s3-port", type=int, default=0,
                   help="the S3 endpoint's port on 127.0.0.1; 0 picks a free one at every start")
    p.add_argument("--control-port", type=int, default=0,
                   help="the control plane's (SSM, SageMaker, SNS) port on 127.0.0.1; 0 picks a free one at every start")
    p.add_argument("--once", action="store_true", default=os.environ.get("ONCE", "").strip().lower() in TRUE_WORDS,
                   help="stop everything after the run and a prediction (also env ONCE=1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", dest="recipe", action="store_const", const="full", default="quick",
                   help="the same as --recipe full: the training entrypoint's default recipe on all the data (long on a CPU)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="quick",
                   help="quick: a subset and a narrow net, minutes on 2 cores; full: the entrypoint's defaults; "
                        "cloud: cdk.json's hyperparameters (sized for a GPU)")
    p.add_argument("--epochs", type=int, help="passes over the training set (default: the recipe's)")
    p.add_argument("--limit-per-class", type=int,
                   help="use at most this many images per class, 0 = all (default: the recipe's)")
    p.add_argument("--hp", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                   help="any other training hyperparameter, as in python -m training_job.train --help (repeatable)")
    p.add_argument("--retrain", action="store_true",
                   help="rewrite the _READY marker even if the dataset is unchanged, which starts a new run")
    p.add_argument("--gate-threshold", type=_key_value, action="append", default=[], metavar="METRIC=MIN",
                   help="the least a new model must score on one metric to be promoted, e.g. roc_auc=0.95 "
                        "(repeatable; default: cdk.json gateThresholds)")
    add_bool(p, "--gate-require-improvement", default=None,
             help="also require beating the promoted model (default: cdk.json gateRequireImprovement)")
    p.add_argument("--gate-min-improvement", type=float, metavar="DELTA",
                   help="how much better than the promoted model a new one must be "
                        "(default: cdk.json gateMinImprovement)")
    p.add_argument("--reference", type=Path, default=REFERENCE_MODEL,
                   help="the model.tar.gz that serves until a trained model is promoted")
    p.add_argument("--api-key", help="the key POST /predict requires; default: kept in the state folder")
    p.add_argument("--concurrency", type=int, default=4, help="Lambda execution environments behind the API")
    p.add_argument("--state-dir", type=Path, default=STATE_DIR,
                   help="S3 data, executions, logs and the API key (kept between runs)")
    p.add_argument("--serve-seconds", type=float, default=0.0,
                   help="without --once: stop after this many seconds of serving (0 = until Ctrl-C)")
    p.add_argument("--serve-only", action="store_true",
                   help="start the servers and the API with the model in service; no upload and no training (a dataset "
                        "uploaded meanwhile is trained at the next start without --serve-only)")
    p.add_argument("--quiet-training", action="store_true", help="keep the training job's output in its log file only")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def options_from(args: argparse.Namespace, data: Path | None, interactive: bool) -> TwinOptions:
    hp = dict(args.hp)
    if args.epochs is not None:
        hp["epochs"] = str(args.epochs)
    if args.limit_per_class is not None:
        hp["limit-per-class"] = str(args.limit_per_class)
    thresholds = None
    if args.gate_threshold:
        from ..config import load

        thresholds = dict(load().gate_thresholds)
        thresholds.update({k: float(v) for k, v in args.gate_threshold})
    return TwinOptions(state_dir=args.state_dir, data=data, dataset_name=args.dataset_name, port=args.port,
                       s3_port=args.s3_port, control_port=args.control_port,
                       recipe=args.recipe, hyperparameters=hp, gate_thresholds=thresholds,
                       gate_require_improvement=args.gate_require_improvement,
                       gate_min_improvement=args.gate_min_improvement, reference=args.reference,
                       api_key=args.api_key, concurrency=args.concurrency, retrain=args.retrain,
                       interactive=interactive, echo_training=not args.quiet_training)


def say(text: str = "") -> None:
    print(text, flush=True)


def show_prediction(twin: Twin, image: Path | None) -> bool:
    if image is None:
        say("prediction: no X-ray found to send (pass --data with train/ images)")
        return False
    status, doc = twin.predict(image)
    shown = f"{image.parent.name}/{image.name}"
    if status == 200 and isinstance(doc, dict):
        say(f"prediction  POST /predict {shown} (folder label {image.parent.name}) -> {doc['label']}  "
            f"P(pneumonia)={doc['probability']:.3f} threshold={doc['threshold']:.3f}  model {doc['model']['version']}")
        return True
    message = doc.get("error", doc).get("message") if isinstance(doc, dict) else str(doc)[:300]
    say(f"prediction  POST /predict {shown} -> HTTP {status}: {message}")
    return False


def show_run(report: RunReport) -> None:
    if report.outcome == "duplicate":
        say(f"run         none started: this marker version already ran as {report.run_id} ({report.detail}); "
            "use --retrain to train again on the same data")
        return
    say(f"run         {report.run_id}: {report.execution.status if report.execution else report.status} "
        f"via {' -> '.join(report.execution.path) if report.execution else '?'}")
    say(f"outcome     {report.outcome}: {report.detail}")
    if report.execution is not None:
        for line in comparison_table(report.execution.state):
            say(line)


def comparison_table(state: dict[str, Any]) -> list[str]:
    """Candidate vs the model in service on the evaluation set, with 95 % CIs, the paired tests
    and the gate's decision; or the plain statement that only validation was available."""
    from shared.evaluation import format_with_ci

    from ..functions.notify import comparison_line

    ev, gate = state.get("evaluation") or {}, state.get("gate") or {}
    if not ev:
        return []
    lines = [f"judged on   {ev.get('judged_on')}"]
    cand, champ = ev.get("metrics"), ((ev.get("in_service") or {}).get("metrics"))
    if cand:
        def nan(m):
            return {**m, "ci": {k: [float("nan") if x is None else x for x in v] for k, v in m.get("ci", {}).items()}}

        names = ("roc_auc", "accuracy", "sensitivity", "specificity", "sens_at_spec90")
        lines.append(f"            {'(95% CI)':<16}{'candidate ' + ev['model_version']:<44}"
                     + (f"in service {ev['in_service']['model_version']}" if champ else ""))
        for n in names:
            lines.append(f"            {n:<16}{format_with_ci(nan(cand), n):<44}" + (format_with_ci(nan(champ), n) if champ else ""))
        if ev.get("comparison"):
            lines.append("paired      " + comparison_line(ev["comparison"], ev["in_service"]["model_version"]))
    lines.append("decision    " + ("approved" if gate.get("approved") else "rejected: " + "; ".join(gate.get("reasons") or [])))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data if args.data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if not args.serve_only and (data is None or not Path(data).is_dir()):
        where = f"{data} does not exist" if data is not None else f"the team copy at {DEFAULT_DATA} is not here"
        print(f"no dataset: {where}.\nUse {KAGGLE_HINT}.", file=sys.stderr)
        return 2
    interactive = sys.stdout.isatty() and sys.stderr.isatty()

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    data = Path(data) if data is not None else None
    twin = Twin(options_from(args, data, interactive), say=say)
    try:
        twin.claim()  # a busy state folder or port: one line, before anything starts
    except RuntimeError as exc:
        print(f"twin not started: {exc}", file=sys.stderr)
        return 1
    code = 0
    try:
        say("== local twin: starting S3, the control plane and the API on 127.0.0.1")
        twin.start()
        say(f"API         {twin.url}   (GET / is the upload page, GET /health is open)")
        say(f"API key     {twin.api_key}   (header x-api-key on POST /predict; kept in {twin.state_dir / 'api-key'})")
        say(f"credentials AWS_ACCESS_KEY_ID={twin.credentials.access_key_id} "
            f"AWS_SECRET_ACCESS_KEY={twin.credentials.secret_access_key}   (S3 and the control plane accept "
            f"only these, until the next start; with the endpoints in {twin.state_file}, which --twin reads)")
        say(f"in service  {twin.in_service()}")
        image = sample_image(data)
        show_prediction(twin, image)
        if args.serve_only:
            if not args.once:
                serve(twin, args.serve_seconds, watch=False)
            else:
                announce_untrained(twin, MarkerWatcher(twin.s3, twin.data_bucket).current())
            return 0

        for report in twin.resume_interrupted():
            show_run(report)
        name = twin.dataset_name(data)
        say(f"== upload {data} -> s3://{twin.data_bucket}/datasets/{name}/ (marker last)")
        try:
            up = twin.upload(data, name)
        except (DatasetLayoutError, RuntimeError) as exc:
            say(f"upload failed: {exc}")
            return 1
        say(f"upload      {up.uploaded} uploaded, {up.skipped} already there; marker "
            f"{'written' if up.marker_written else 'unchanged'}; counts {json.dumps(up.manifest['counts'])}")

        say("== trigger: the marker's S3 event -> DatasetReady rule -> starter -> pipeline")
        event = twin.marker_event(name)
        report = twin.handle(event) if event is not None else None
        if report is None:
            say("run         no marker event (nothing to train on)")
        else:
            show_run(report)
            if report.execution is not None and report.execution.status == "FAILED":
                code = 1
            if report.execution is not None and report.execution.state.get("promotion"):
                version = report.execution.state["promotion"]["pointer"]["model_version"]
                if not twin.wait_for_model(version):
                    say(f"the API did not switch to {version} in time")
        say("== serving")
        say(f"in service  {twin.in_service()}")
        if not show_prediction(twin, image):
            code = 1
        say(f"try it      curl -s -H 'x-api-key: {twin.api_key}' -H 'Content-Type: image/jpeg' "
            f"--data-binary @{image or 'xray.jpeg'} '{twin.url}predict'   (add ?explain=1 for the heatmap)")
        say(f"            open {twin.url} in a browser (paste the API key in the page)")
        code = max(code, catch_up(twin, name))
        if args.once:
            return code
        serve(twin, args.serve_seconds)
        return 0
    except KeyboardInterrupt:
        say("\nstopping (interrupted)")
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        twin.stop()
        say("stopped: every server and process the twin started has exited")


def upload_line(twin: Twin) -> str:
    """The upload command for this twin, runnable as printed from the repository root."""
    state = "" if twin.state_dir == STATE_DIR.resolve() else f" --state-dir {twin.state_dir}"
    return f".venv/bin/python -m infra.upload --twin{state} --name NAME --data DIR"


def announce_untrained(twin: Twin, events: list[dict[str, Any]]) -> None:
    """--serve-only: say, for each marker not yet trained on, that this twin will not train it."""
    for event in events:
        if twin.not_yet_run(event):
            key = event["detail"]["object"]["key"]
            say(f"not training s3://{twin.data_bucket}/{key}: --serve-only does not train; the next start "
                "without --serve-only will")


def catch_up(twin: Twin, handled: str | None = None) -> int:
    """Run every dataset marker whose current version has not run yet (uploaded while the twin was
    stopped or serving only); 1 when one of those runs failed."""
    code = 0
    for event in MarkerWatcher(twin.s3, twin.data_bucket).current():
        if event["detail"]["object"]["key"] == f"datasets/{handled}/_READY" or not twin.not_yet_run(event):
            continue
        say(f"== marker s3://{twin.data_bucket}/{event['detail']['object']['key']} has not run yet: running it")
        report = twin.handle(event)
        if report is not None and report.outcome != "duplicate":
            show_run(report)
            code = max(code, int(report.status == "FAILED"))
    return code


def serve(twin: Twin, seconds: float, watch: bool = True) -> None:
    """Serve until interrupted, starting a run for each new marker version uploaded meanwhile
    (without ``watch``: saying, for each, that it is left for the next start)."""
    if watch:
        say(f"serving on {twin.url} -- upload a dataset to the twin's S3 to train again "
            f"({upload_line(twin)}); Ctrl-C stops everything")
    else:
        say(f"serving on {twin.url} (--serve-only: uploaded datasets are not trained until a start without it) "
            "-- Ctrl-C stops everything")
    watcher = MarkerWatcher(twin.s3, twin.data_bucket)
    first = watcher.current()  # what is there now has been handled (or, serving only, is announced)
    if not watch:
        announce_untrained(twin, first)
    deadline = time.monotonic() + seconds if seconds > 0 else None
    while deadline is None or time.monotonic() < deadline:
        time.sleep(WATCH_INTERVAL)
        if not watch:
            announce_untrained(twin, watcher.poll())
            continue
        for event in watcher.poll():
            report = twin.handle(event)
            if report is not None and report.outcome != "duplicate":
                show_run(report)
                say(f"in service  {twin.in_service()}")


if __name__ == "__main__":
    sys.exit(main())
