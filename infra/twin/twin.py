"""The local twin: the stack's flow on loopback, built from the same code the cloud runs.

:class:`Twin` starts the servers, lays out what the stack would create (buckets, the model package
group, the notification topic, the model pointer), uploads a dataset with :mod:`infra.upload`,
turns each new ``_READY`` marker into one run of :data:`infra.pipeline.PIPELINE` through
:func:`infra.pipeline.execute` (training in a subprocess under the SageMaker contract), and serves
the inference Lambda's handler behind a local API Gateway.

The shipped reference model stands in for the cloud's "no model promoted yet": it is uploaded and
pointed to when nothing else is, so the API answers from the start. When the dataset has a test/
split, the Evaluate step scores a trained model and the reference on it and the gate keeps the
reference unless the new model is non-inferior on the same images; without one, a trained model
replaces the reference once it clears the thresholds on its own validation split (the two
models' validation figures come from different splits and are not compared).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import mimetypes
import os
import re
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.bundle import ARCHIVE_NAME, BundleError, file_sha256, read_bundle
from shared.dataset import MARKER_NAME
from shared.pointer import ModelPointer

from .. import config as infra_config
from ..config import ROOT
from ..functions.common import DATASETS_PREFIX, MODELS_PREFIX, Clients, Settings, StepContext, failure_reason
from ..functions.gate import promoted_pointer
from ..functions.starter import initial_state
from ..names import model_package_group_name, pointer_parameter_name
from ..pipeline import Execution, execute
from ..upload import upload_dataset
from .auth import new_credentials, set_credentials
from .endpoints import TwinState, write_state
from .gateway import LocalApiGateway, lambda_environment
from .processes import ProcessGroup
from .servers import ControlPlane, SeaweedS3, client, ports_in_use
from .training import LocalTrainingJob
from .trigger import Executions, MarkerWatcher, matches_rule

STATE_DIR = ROOT / ".twin"
# The shipped model that serves until a trained one clears the gate.
REFERENCE_MODEL = ROOT / "models" / "reference" / ARCHIVE_NAME
REFERENCE_KEY = f"{MODELS_PREFIX}reference/{ARCHIVE_NAME}"
REFERENCE_REASON = "shipped reference model: serves until a trained model clears the quality gate"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "chest_xray_224"
SAMPLE_IMAGES = ROOT.parent / "shared" / "data" / "chest_xray_original_sample"
KAGGLE_HINT = ('the public Kaggle dataset "Chest X-Ray Images (Pneumonia)" '
               "(kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia), unpacked: pass its chest_xray/ "
               "folder with --data")

# Which of the entrypoint's recipes (training_job/recipes.py) each twin preset runs. quick: a few
# minutes on two CPU cores; full: the entrypoint's default (cpu) recipe on all the data; cloud:
# cdk.json's hyperparameters, as the stack passes them to SageMaker (sized for a GPU instance).
RECIPES: dict[str, dict[str, str]] = {"quick": {"recipe": "quick"}, "full": {"recipe": "cpu"}, "cloud": {}}


def _norm_hp(hp: dict[str, Any]) -> dict[str, str]:
    """One spelling per hyperparameter (dashes), so an override replaces the default it names."""
    return {str(k).replace("_", "-"): str(v) for k, v in hp.items()}


@dataclass
class TwinOptions:
    state_dir: Path = STATE_DIR
    data: Path | None = None
    dataset_name: str | None = None
    port: int = 0
    s3_port: int = 0  # 0: a free one at every start
    control_port: int = 0
    recipe: str = "quick"
    hyperparameters: dict[str, str] = field(default_factory=dict)  # overrides, any spelling
    gate_thresholds: dict[str, float] | None = None
    gate_require_improvement: bool | None = None
    gate_min_improvement: float | None = None
    reference: Path | None = REFERENCE_MODEL
    api_key: str | None = None
    concurrency: int = 4
    retrain: bool = False
    interactive: bool = False  # progress bars and training output on the terminal
    echo_training: bool = True
    pointer_ttl_seconds: int = 2
    upload_workers: int = 8


@dataclass
class RunReport:
    """What happened to one marker event, for the console."""

    run_id: str
    dataset: str
    status: str  # the execution's SUCCEEDED / FAILED, or "duplicate" when the marker version already ran
    outcome: str  # promoted / rejected / failed / duplicate
    detail: str
    execution: Execution | None = None
    record: dict[str, Any] | None = None


class Twin:
    def __init__(self, options: TwinOptions, say: Callable[[str], None] = print) -> None:
        self.o = options
        self.say = say
        self.state_dir = Path(options.state_dir).resolve()
        self.logs = self.state_dir / "logs"
        # Working copies (training jobs' /opt/ml trees, model checks): emptied at every start, so
        # nothing is left behind even by a twin that was killed.
        self.tmp_dir = self.state_dir / "tmp"
        self.processes = ProcessGroup()
        self.cfg = infra_config.load()
        overrides = {"gate_thresholds": options.gate_thresholds,
                     "gate_require_improvement": options.gate_require_improvement,
                     "gate_min_improvement": options.gate_min_improvement}
        self.cfg = self.cfg.with_overrides(**overrides)
        stack = self.cfg.stack_name
        self.data_bucket = f"{stack.lower()}-data"
        self.artifacts_bucket = f"{stack.lower()}-artifacts"
        self.pointer_parameter = pointer_parameter_name(stack)
        self.package_group = model_package_group_name(stack)
        self.topic_name = f"{stack}-notifications"
        self.s3_server: SeaweedS3 | None = None
        self.control: ControlPlane | None = None
        self.gateway: LocalApiGateway | None = None
        self.executions = Executions(self.state_dir / "executions")
        self.topic_arn = ""
        self.api_key = ""
        self._s3 = None
        self._run_lock = threading.Lock()
        self._lock = None  # the state folder's lock file, held while this twin runs
        self.credentials = None
        self.state_file: Path | None = None
        self.reference_uri = f"s3://{self.artifacts_bucket}/{REFERENCE_KEY}"

    # -- lifecycle ----------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the state folder and check the pinned ports, before anything starts.

        Raises :class:`RuntimeError` in one line when another twin holds the folder or a port is taken."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = claim_state_dir(self.state_dir)
        busy = ports_in_use(self.o.port, self.o.s3_port, self.o.control_port)
        if busy:
            raise RuntimeError(f"port {', '.join(map(str, busy))} on 127.0.0.1 is already in use (another twin, or "
                               "another program): stop it or choose other --port/--s3-port/--control-port")

    def start(self) -> Twin:
        self.claim()
        self.logs.mkdir(parents=True, exist_ok=True)
        for leftover in (self.tmp_dir, self.state_dir / "lambda-tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        self.credentials = new_credentials()  # the only ones the servers accept, until the next start
        set_credentials(self.credentials)
        self.s3_server = SeaweedS3(self.state_dir / "seaweedfs", self.processes, self.logs,
                                   port=self.o.s3_port).start()
        self.say(f"S3 (SeaweedFS)        {self.s3_server.endpoint}   data in {self.state_dir / 'seaweedfs'}")
        self.control = ControlPlane(self.state_dir / "control-plane.json", f"/{self.cfg.stack_name}",
                                    self.package_group, port=self.o.control_port).start()
        self.say(f"SSM, SageMaker, SNS   {self.control.endpoint}   (moto)")
        self._s3 = client("s3", self.s3_server.endpoint)
        self._create_resources()
        self.api_key = self._api_key()
        self.ensure_model_in_service()
        self.start_api()
        self.state_file = write_state(self.state_dir, TwinState(
            s3_endpoint=self.s3_server.endpoint, control_endpoint=self.control.endpoint, api_url=self.url,
            data_bucket=self.data_bucket, artifacts_bucket=self.artifacts_bucket,
            access_key_id=self.credentials.access_key_id, secret_access_key=self.credentials.secret_access_key,
            pid=os.getpid()))
        return self

    def start_api(self) -> LocalApiGateway:
        """The local API Gateway and its execution environments (each a cold start of the function)."""
        self.gateway = LocalApiGateway(
            api_key=self.api_key, processes=self.processes, log_dir=self.logs, port=self.o.port,
            concurrency=self.o.concurrency,
            cors_origins=self.cfg.cors_allow_origins,
            lambda_env=lambda_environment(s3_endpoint=self.s3_server.endpoint,
                                          control_endpoint=self.control.endpoint,
                                          pointer_parameter=self.pointer_parameter,
                                          cache_dir=self.state_dir / "lambda-tmp",
                                          ttl_seconds=self.o.pointer_ttl_seconds,
                                          cors_origins=self.cfg.cors_allow_origins,
                                          extra={"POWERTOOLS_SERVICE_NAME": self.cfg.service_name,
                                                 "POWERTOOLS_METRICS_NAMESPACE": self.cfg.metrics_namespace}),
        ).start()
        return self.gateway

    def stop(self) -> None:
        """Stop everything this twin started; safe to call twice and after a failed start."""
        errors = []
        for step in (lambda: self.gateway and self.gateway.stop(),
                     lambda: self.control and self.control.stop(),
                     lambda: self.s3_server and self.s3_server.stop(),
                     self.processes.stop_all):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                errors.append(exc)
        self.gateway = self.control = self.s3_server = None
        shutil.rmtree(self.state_dir / "lambda-tmp", ignore_errors=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.state_dir / "twin.json").unlink()
            self._lock.close()
            self._lock = None
        if errors:
            raise errors[0]

    def __enter__(self) -> Twin:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- what the stack creates ---------------------------------------------------------------

    @property
    def s3(self) -> Any:
        return self._s3

    @property
    def url(self) -> str:
        return self.gateway.url if self.gateway else ""

    def _create_resources(self) -> None:
        for bucket in (self.data_bucket, self.artifacts_bucket):
            try:
                self.s3.create_bucket(Bucket=bucket)
            except (self.s3.exceptions.BucketAlreadyOwnedByYou, self.s3.exceptions.BucketAlreadyExists):
                pass  # a later run of the twin: the buckets are in the persisted data
            # Versioned like the stack's buckets: a run is named after the marker's version id.
            self.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        self.control.ensure_group()
        self.topic_arn = self.control.client("sns").create_topic(Name=self.topic_name)["TopicArn"]

    def _api_key(self) -> str:
        path = self.state_dir / "api-key"
        if self.o.api_key:
            key = self.o.api_key
        else:
            try:
                key = path.read_text().strip()
            except OSError:
                key = ""
            key = key or secrets.token_hex(24)  # never starts with '-', which a command line would read as an option
        if len(key) < 20 or not re.fullmatch(r"[A-Za-z0-9_\-]+", key):
            raise ValueError("an API key must be at least 20 characters of letters, digits, '-' and '_'")
        path.write_text(key + "\n")
        with contextlib.suppress(OSError):
            path.chmod(0o600)
        return key

    def context(self) -> StepContext:
        gate = self.cfg.gate_settings()
        if self.serving_reference():
            # The reference stands in for an empty pointer: the first trained model faces the thresholds only.
            gate = {**gate, "require_improvement": False}
        settings = Settings(data_bucket=self.data_bucket, artifacts_bucket=self.artifacts_bucket,
                            pointer_parameter=self.pointer_parameter, topic_arn=self.topic_arn,
                            model_package_group=self.package_group, state_machine_arn="", gate=gate,
                            evaluation_dataset=self.cfg.evaluation_dataset_uri)
        return StepContext(settings, Clients(s3=self.s3, ssm=self.control.client("ssm"),
                                             sns=self.control.client("sns"),
                                             sagemaker=self.control.client("sagemaker")))

    # -- the model in service -----------------------------------------------------------------

    def pointer(self) -> ModelPointer | None:
        return promoted_pointer(self.control.client("ssm"), self.pointer_parameter)

    def serving_reference(self) -> bool:
        p = self.pointer()
        return p is not None and p.model_uri == self.reference_uri

    def ensure_model_in_service(self) -> None:
        """Make sure some model can serve: the promoted one, else its previous one, else the reference.

        The promoted archive is checked as serving loads it (downloaded, SHA-256 against the
        pointer, unpacked, ``bundle.json`` read). When it fails, the pointer is left naming it, so
        the execution environments keep retrying it, and they serve its ``previous`` model; when
        that fails too (or there is none), the shipped reference model becomes the ``previous``.
        """
        current = self.pointer()
        if current is not None:
            problem = self._problem(current)
            if problem is None:
                return
            self.say(f"the promoted model {current.model_version} cannot be loaded: {problem}")
            if current.model_uri != self.reference_uri and current.previous is not None:
                if self._problem(current.previous) is None:
                    self.say(f"serving the previous model {current.previous.model_version} instead until it can "
                             "(GET /health says so)")
                    return
        reference = self._reference_pointer()
        if reference is None:
            return
        if current is not None and current.model_uri != self.reference_uri:
            self.say("serving the shipped reference model instead until it can (GET /health says so)")
            pointer = dataclasses.replace(current, previous=reference)
        else:
            pointer = reference
        self.control.client("ssm").put_parameter(Name=self.pointer_parameter, Value=pointer.to_json(),
                                                 Type="String", Overwrite=True)
        self.control.save()

    def _reference_pointer(self) -> ModelPointer | None:
        """The shipped reference model, uploaded to the artifacts bucket; None when it is unusable."""
        ref = self.o.reference
        if ref is None or not Path(ref).is_file():
            self.say(f"no reference model at {ref}: the API answers 503 until a trained model is promoted")
            return None
        try:
            bundle = read_bundle(ref, unpack_to=self.tmp_dir / "reference-check")
        except BundleError as exc:
            self.say(f"the reference model {ref} is not a valid bundle ({exc}); the API answers 503 until a "
                     "trained model is promoted")
            return None
        finally:
            shutil.rmtree(self.tmp_dir / "reference-check", ignore_errors=True)
        sha = file_sha256(ref)
        self.s3.upload_file(str(ref), self.artifacts_bucket, REFERENCE_KEY)
        return ModelPointer(model_uri=self.reference_uri, sha256=sha, model_version=bundle.version,
                            promoted_at=_now(), reason=REFERENCE_REASON)

    def _problem(self, pointer: ModelPointer) -> str | None:
        """Why serving could not load the archive ``pointer`` names, or None when it can."""
        work = self.tmp_dir / "model-check"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            if pointer.model_uri.startswith("s3://"):
                bucket, _, key = pointer.model_uri[5:].partition("/")
                archive = work / ARCHIVE_NAME
                try:
                    self.s3.download_file(bucket, key, str(archive))
                except self.s3.exceptions.ClientError as exc:
                    return f"it is not in S3 ({exc.response.get('Error', {}).get('Code', 'error')})"
            else:
                archive = Path(pointer.model_uri.removeprefix("file://"))
                if not archive.is_file():
                    return "the file is missing"
            if file_sha256(archive) != pointer.sha256:
                return "its SHA-256 is not the pointer's"
            read_bundle(archive, unpack_to=work / "bundle")
        except (BundleError, OSError) as exc:
            return f"it is not a valid model bundle ({exc})"
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return None

    def in_service(self) -> str:
        """Which model serves and why, in one sentence."""
        p = self.pointer()
        if p is None:
            return "no model is in service (nothing promoted and no reference model): the API answers 503"
        if self.gateway is not None:
            status, doc = self.request("GET", "/health", timeout=10)
            if status == 200 and isinstance(doc, dict) and doc.get("fallback"):
                fb = doc["fallback"]
                return (f"{doc['model']['version']} as a fallback: the promoted model {fb['promoted_version']} "
                        f"cannot be loaded (retried every minute; the Lambda log says why)")
            if status != 200:
                return f"no model can be loaded: the API answers {status} (the Lambda log says why)"
        if p.model_uri == self.reference_uri:
            return f"{p.model_version}, the shipped reference model (no trained model has cleared the gate yet)"
        return f"{p.model_version}, promoted {p.promoted_at} ({p.reason})"

    # -- dataset, trigger, runs ---------------------------------------------------------------

    def dataset_name(self, data: Path) -> str:
        name = self.o.dataset_name or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).resolve().name).strip("-.")
        return name or "dataset"

    def upload(self, data: Path, name: str | None = None, retrain: bool | None = None):
        name = name or self.dataset_name(data)
        return upload_dataset(Path(data), self.data_bucket, name, self.s3, workers=self.o.upload_workers,
                              retrain=self.o.retrain if retrain is None else retrain,
                              progress=self.o.interactive, log=self.say)

    def marker_event(self, dataset: str) -> dict[str, Any] | None:
        return MarkerWatcher(self.s3, self.data_bucket).marker(f"{DATASETS_PREFIX}{dataset}/{MARKER_NAME}")

    def hyperparameters(self) -> dict[str, str]:
        """Plain values; the training step encodes them as SageMaker delivers them."""
        hp = _norm_hp(self.cfg.hyperparameters) if self.o.recipe == "cloud" else {}
        hp.update(RECIPES[self.o.recipe])
        hp.update(_norm_hp(self.o.hyperparameters))
        hp["progress"] = "bar" if self.o.interactive else "plain"
        return hp

    def handle(self, event: dict[str, Any]) -> RunReport | None:
        """The rule, the starter and the execution for one S3 event; None when the rule ignores it."""
        if not matches_rule(event, self.data_bucket):
            return None
        state = initial_state(event, self.context().settings)
        if state is None:
            return None
        rid = state["run"]["run_id"]
        with self._run_lock:
            if not self.executions.start(rid, state):
                rec = self.executions.get(rid) or {"name": rid}
                if not any(r["name"] == rid for r in self.executions.interrupted()):
                    return RunReport(rid, state["run"]["dataset"], "duplicate", "duplicate", describe_record(rec),
                                     record=rec)
                self.executions.resume(rid)
                self.say(f"run {rid} was interrupted when the twin stopped; running it again "
                         "(training resumes from its checkpoints)")
            return self._execute(rid, state)

    def not_yet_run(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` is a marker the rule matches whose version has no run yet."""
        if not matches_rule(event, self.data_bucket):
            return False
        state = initial_state(event, self.context().settings)
        return state is not None and self.executions.get(state["run"]["run_id"]) is None

    def resume_interrupted(self) -> list[RunReport]:
        """Run again the executions a stopped twin left unfinished."""
        reports = []
        with self._run_lock:
            for rec in self.executions.interrupted():
                self.executions.resume(rec["name"])
                self.say(f"run {rec['name']} was interrupted when the twin stopped; running it again "
                         "(training resumes from its checkpoints)")
                reports.append(self._execute(rec["name"], rec["input"]))
        return reports

    def _execute(self, rid: str, state: dict[str, Any]) -> RunReport:
        dataset = state["run"]["dataset"]
        self.say(f"run {rid} started for dataset {dataset} (marker {state['run']['marker_key']})")
        train = LocalTrainingJob(hyperparameters=self.hyperparameters(), processes=self.processes,
                                 log_dir=self.logs / "training", max_runtime_seconds=self.cfg.max_runtime_seconds,
                                 echo=self.o.echo_training, progress=self.o.interactive, say=self.say,
                                 work_dir=self.tmp_dir)
        # An interruption (Ctrl-C) propagates and leaves the record RUNNING: the next start runs it again.
        execution = execute(state, self.context(), train=train)
        record = self.executions.finish(rid, execution.status, execution.state, execution.path)
        self.control.save()
        outcome = (execution.state.get("notification") or {}).get("outcome") or (
            "failed" if execution.status == "FAILED" else "promoted" if execution.state.get("promotion") else "rejected")
        return RunReport(rid, dataset, execution.status, outcome, describe_record(record), execution, record)

    # -- the API, as a client -----------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, Any] | str]:
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the twin's own loopback API
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        text = raw.decode("utf-8", "replace")
        if "json" in ctype:
            with contextlib.suppress(ValueError):
                return status, json.loads(text)
        return status, text

    def predict(self, image: Path, explain: bool = False) -> tuple[int, dict[str, Any] | str]:
        ctype = mimetypes.guess_type(str(image))[0] or "application/octet-stream"
        if image.suffix.lower() == ".dcm":
            ctype = "application/dicom"
        return self.request("POST", "/predict" + ("?explain=1" if explain else ""), Path(image).read_bytes(),
                            {"Content-Type": ctype, "x-api-key": self.api_key})

    def wait_for_model(self, version: str, timeout: float = 60.0) -> bool:
        """True once every execution environment answers with ``version`` (each re-reads the pointer
        every few seconds on its own): as many answers in a row as there are environments, which the
        pool hands requests to in turn."""
        deadline = time.monotonic() + timeout
        in_a_row = 0
        while time.monotonic() < deadline:
            status, doc = self.request("GET", "/health", timeout=10)
            if status == 200 and isinstance(doc, dict) and doc.get("model", {}).get("version") == version:
                in_a_row += 1
                if in_a_row >= max(1, self.o.concurrency):
                    return True
                continue
            in_a_row = 0
            time.sleep(0.5)
        return False


def claim_state_dir(state_dir: Path) -> Any:
    """An exclusive lock on ``state_dir/lock`` (held until the returned file is closed).

    Raises :class:`RuntimeError` when another twin holds it."""
    import fcntl

    f = open(Path(state_dir) / "lock", "a+")  # noqa: SIM115 - held for the twin's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise RuntimeError(f"the state folder {state_dir} is in use by another twin (pid {pid}): stop that one, "
                           "or pass another --state-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_record(rec: dict[str, Any]) -> str:
    """One or two sentences on how an execution ended."""
    state = rec.get("output") or {}
    status = rec.get("status", "?")
    if status == "RUNNING":
        return f"run {rec.get('name')} is still running (started {rec.get('started_at')})"
    if state.get("error"):
        return f"failed: {failure_reason(state['error'])}"
    gate = state.get("gate") or {}
    metrics = gate.get("metrics") or {}
    shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("roc_auc", "accuracy", "sensitivity", "specificity")
                      if k in metrics)
    if state.get("promotion"):
        return f"model {gate.get('model_version')} cleared the gate ({shown}) and was promoted"
    return (f"model {gate.get('model_version')} was rejected by the gate: " + "; ".join(gate.get("reasons") or [])
            + (f" ({shown})" if shown else ""))


def sample_image(data: Path | None) -> Path | None:
    """A real X-ray to show a prediction for: a full-size original when the team data is here."""
    for folder in (SAMPLE_IMAGES / "train" / "PNEUMONIA", SAMPLE_IMAGES / "train" / "NORMAL"):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
            if found:
                return found[0]
    if data is not None:
        for split in ("train", "val", "test"):
            for cls in ("PNEUMONIA", "NORMAL"):
                folder = Path(data) / split / cls
                if folder.is_dir():
                    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
                    if found:
                        return found[0]
    return None

