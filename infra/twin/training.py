"""The pipeline's training step, locally: the entrypoint under SageMaker's container contract.

What a SageMaker training job does with ``training_job/train.py``, done on this machine:

1. an ``/opt/ml``-like tree in a temporary folder: ``input/data/<channel>/`` downloaded from the
   S3 server (File mode: every object under the channel's prefix), ``input/config/*.json``,
   ``model/``, ``output/``, ``checkpoints/`` (filled from the job's checkpoint URI, so a job
   that was interrupted resumes, and copied back there while it runs, as SageMaker syncs it);
2. ``hyperparameters.json`` JSON-encoded as the state machine and the SageMaker SDK send it
   (:func:`infra.config.encode_hyperparameters`), and the training image's entrypoint
   (``training_job/container.py train``) in a subprocess with ``SAGEMAKER_BASE_DIR`` at that tree:
   it decodes the file, sets the ``SM_*`` variables and runs ``train.py`` exactly as in the cloud,
   bounded by the stack's ``maxRuntimeSeconds``;
3. on success ``model/`` is packed into ``model.tar.gz`` (:func:`shared.bundle.pack`) and
   uploaded to ``<output_uri><job>/output/model.tar.gz`` (and ``output/data`` as
   ``output.tar.gz``), where SageMaker puts them; on failure the ``output/failure`` file is the
   reason, raised as :class:`TrainingJobFailed` so the run takes the failure path.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from shared.bundle import ARCHIVE_NAME, BundleError, pack
from training_job.container import BASE_DIR_ENV, decode_hyperparameters, to_cmd_args, user_hyperparameters

from ..config import ROOT, TRAINING_ENTRYPOINT, encode_hyperparameters
from ..functions.common import StepContext, StepError, parse_s3_uri
from .processes import ProcessGroup, stop

FAILURE_REASON_LIMIT = 1024  # what DescribeTrainingJob's FailureReason holds
CHECKPOINT_SYNC_SECONDS = 10.0
_DOWNLOAD_WORKERS = 8


class TrainingJobFailed(StepError):
    """The training job ended without a model; the message is SageMaker's FailureReason."""


def _list(s3: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
    return out


def download_prefix(s3: Any, uri: str, dest: Path, progress: bool = False, desc: str = "") -> int:
    """Every object under ``uri`` into ``dest`` (relative paths kept), as File-mode channels are."""
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    objects = [(k, n) for k, n in _list(s3, bucket, prefix) if not k.endswith("/")]
    bar = None
    if progress and objects:
        from tqdm import tqdm

        bar = tqdm(total=len(objects), unit="file", desc=desc or "download", leave=False)

    def get(key: str) -> None:
        target = dest / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))

    with ThreadPoolExecutor(max_workers=_DOWNLOAD_WORKERS) as pool:
        for fut in [pool.submit(get, k) for k, _ in objects]:
            fut.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return len(objects)


def upload_folder(s3: Any, folder: Path, uri: str, seen: dict[str, float] | None = None) -> int:
    """Files in ``folder`` that changed since ``seen`` to ``uri`` (the checkpoint sync)."""
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.endswith((".tmp", ".part")) or rel.startswith("."):
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if seen is not None and seen.get(rel) == mtime:
            continue
        try:
            s3.upload_file(str(path), bucket, prefix + rel)
        except FileNotFoundError:  # replaced while we looked; the next sync takes the new one
            continue
        if seen is not None:
            seen[rel] = mtime
        n += 1
    return n


def hyperparameter_args(hp: dict[str, Any]) -> list[str]:
    """The command line the training image's entrypoint builds from ``hp`` as SageMaker delivers it."""
    return to_cmd_args(user_hyperparameters(decode_hyperparameters(encode_hyperparameters(hp))))


class _Echo:
    """Copies the job's output to its log file and, optionally, to the terminal (bars included)."""

    def __init__(self, src: IO[bytes], log: IO[bytes], sink: IO[bytes] | None, prefix: bytes = b"") -> None:
        self.src, self.log, self.sink, self.prefix = src, log, sink, prefix
        self.thread = threading.Thread(target=self._run, name="training-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        at_line_start = True
        while True:
            chunk = os.read(self.src.fileno(), 65536)
            if not chunk:
                break
            self.log.write(chunk)  # an unbuffered file: on disk now
            if self.sink is not None:
                out = bytearray()
                for b in chunk:
                    if at_line_start and self.prefix:
                        out += self.prefix
                    out.append(b)
                    at_line_start = b in (0x0A,)
                self.sink.write(bytes(out))
                self.sink.flush()

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)


class LocalTrainingJob:
    """``train(state, ctx)`` for :func:`infra.pipeline.execute`: one SageMaker job, on this machine."""

    def __init__(self, *, hyperparameters: dict[str, Any], processes: ProcessGroup, log_dir: Path,
                 max_runtime_seconds: int = 7200, echo: bool = True, progress: bool = False,
                 work_dir: Path | None = None, say: Callable[[str], None] = print) -> None:
        self.hyperparameters = dict(hyperparameters)
        self.processes = processes
        self.log_dir = Path(log_dir)
        self.max_runtime_seconds = max_runtime_seconds
        self.echo = echo
        self.progress = progress
        self.work_dir = work_dir
        self.say = say

    def __call__(self, state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        run = state["run"]
        job = run["job_name"]
        s3 = ctx.clients.s3
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{job}.log"
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="opt-ml-", dir=self.work_dir) as tmp:
            opt_ml = Path(tmp)
            env = self._prepare(opt_ml, state, s3)
            checkpoint_uri = run.get("checkpoint_uri")
            cmd = [sys.executable, str(ROOT / TRAINING_ENTRYPOINT), "train"]
            self.say(f"training job {job}: {' '.join(hyperparameter_args(self.hyperparameters))}")
            rc, timed_out = self._run(cmd, opt_ml, env, log_path, s3, checkpoint_uri)
            seconds = max(1, int(time.time() - t0))
            if rc != 0:
                raise TrainingJobFailed(self._failure(job, opt_ml, rc, timed_out, log_path))
            out_prefix = run["output_uri"].rstrip("/") + f"/{job}/output/"
            archive = opt_ml / ARCHIVE_NAME
            try:
                pack(opt_ml / "model", archive)
            except BundleError as exc:
                raise TrainingJobFailed(f"training job {job} failed: ClientError: the model directory holds no "
                                        f"valid bundle: {exc}") from None
            bucket, key = parse_s3_uri(out_prefix + ARCHIVE_NAME)
            s3.upload_file(str(archive), bucket, key)
            self._upload_output_data(s3, opt_ml, out_prefix)
        return {"job_name": job, "status": "Completed", "model_uri": f"s3://{bucket}/{key}",
                "training_seconds": seconds, "billable_seconds": seconds}

    def _prepare(self, opt_ml: Path, state: dict[str, Any], s3: Any) -> dict[str, str]:
        channels = state["dataset"]["channels"]
        data = opt_ml / "input" / "data"
        config = opt_ml / "input" / "config"
        for d in (data, config, opt_ml / "model", opt_ml / "output" / "data", opt_ml / "checkpoints"):
            d.mkdir(parents=True, exist_ok=True)
        for ch in channels:
            name = ch["ChannelName"]
            n = download_prefix(s3, ch["DataSource"]["S3DataSource"]["S3Uri"], data / name, self.progress,
                                f"channel {name}")
            self.say(f"channel {name}: {n} files from {ch['DataSource']['S3DataSource']['S3Uri']}")
        if state["run"].get("checkpoint_uri"):
            n = download_prefix(s3, state["run"]["checkpoint_uri"], opt_ml / "checkpoints")
            if n:
                self.say(f"resuming from {n} checkpoint files at {state['run']['checkpoint_uri']}")
        (config / "hyperparameters.json").write_text(json.dumps(encode_hyperparameters(self.hyperparameters), indent=2))
        (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
        (config / "inputdataconfig.json").write_text(json.dumps(
            {c["ChannelName"]: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}
             for c in channels}, indent=2))
        # The entrypoint sets the SM_* variables from these files, as it does in the image.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "AWS_"))}
        env[BASE_DIR_ENV] = str(opt_ml)
        env.pop("PYTHONPATH", None)
        return env

    def _run(self, cmd: list[str], opt_ml: Path, env: dict[str, str], log_path: Path, s3: Any,
             checkpoint_uri: str | None) -> tuple[int, bool]:
        seen: dict[str, float] = {}
        timed_out = False
        # Unbuffered: every chunk the job prints is in the file as soon as it is read, so a crash or a
        # kill -9 of the twin loses none of it.
        with open(log_path, "ab", buffering=0) as log:
            proc = self.processes.start("training", cmd, env=env, cwd=opt_ml, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            echo = _Echo(proc.stdout, log, sys.stdout.buffer if self.echo else None, b"  | ")
            deadline = time.monotonic() + self.max_runtime_seconds
            next_sync = time.monotonic() + CHECKPOINT_SYNC_SECONDS
            try:
                while proc.poll() is None:
                    with contextlib.suppress(Exception):
                        proc.wait(timeout=1.0)
                    now = time.monotonic()
                    if checkpoint_uri and now >= next_sync:
                        with contextlib.suppress(Exception):  # a missed sync is retried; it never fails the job
                            upload_folder(s3, opt_ml / "checkpoints", checkpoint_uri, seen)
                        next_sync = now + CHECKPOINT_SYNC_SECONDS
                    if now >= deadline:
                        timed_out = True
                        stop(proc, grace=30.0)
            finally:
                if proc.poll() is None:  # interrupted (Ctrl-C): the job stops with the twin
                    stop(proc, grace=10.0)
                if checkpoint_uri:
                    with contextlib.suppress(Exception):
                        upload_folder(s3, opt_ml / "checkpoints", checkpoint_uri, seen)
                echo.join()
                self.processes.forget(proc)
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        return proc.returncode, timed_out

    def _failure(self, job: str, opt_ml: Path, rc: int, timed_out: bool, log_path: Path) -> str:
        if timed_out:
            return (f"training job {job} stopped: MaxRuntimeExceeded: the job ran longer than "
                    f"{self.max_runtime_seconds} s")
        try:
            reason = (opt_ml / "output" / "failure").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            reason = ""
        if not reason:
            reason = f"the training process exited with status {rc} and wrote no failure file (log: {log_path})"
        text = f"training job {job} failed: AlgorithmError: {reason}"
        return text[:FAILURE_REASON_LIMIT]

    @staticmethod
    def _upload_output_data(s3: Any, opt_ml: Path, out_prefix: str) -> None:
        archive = opt_ml / "output.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for p in sorted((opt_ml / "output" / "data").iterdir()):
                tar.add(p, arcname=p.name)
        bucket, key = parse_s3_uri(out_prefix + "output.tar.gz")
        s3.upload_file(str(archive), bucket, key)
