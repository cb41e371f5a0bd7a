"""Lambda execution environments of the inference function, and the pool that hands them events.

Each environment is a child process running :mod:`infra.twin.lambda_runtime`: it imports the
handler once and handles one event at a time. The pool gives an event only to a live, idle
environment. Like Lambda, it tells an event that never reached a function from one that did:

- the environment acknowledges each event as it reads it (``{"taken": true}``). One that is dead
  or dies before that acknowledgement never received the event: it is replaced by a cold start
  and the event goes to another environment, so the client sees no error;
- one that dies *after* taking the event (a crash, out of memory) fails that request, which API
  Gateway answers with 502, and is replaced.

The environments' own output (Powertools' JSON logs, EMF metrics: the stand-in for CloudWatch
Logs) goes to one ``lambda.log``, which rotates at :data:`LOG_MAX_BYTES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ROOT
from .processes import ProcessGroup, stop, tail

LOG = logging.getLogger("cxr.twin.gateway")

ENV_START_TIMEOUT = 180.0
# lambda.log and access.log rotate at this size, keeping this many older files (.1, .2, ...).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


class LambdaError(RuntimeError):
    """The function failed with the event: API Gateway answers 502."""


class NotDelivered(RuntimeError):
    """The environment went away before it took the event: the event can go to another one."""


def rotating_logger(name: str, path: Path) -> logging.Logger:
    """A logger writing each message as given to ``path``, rotated at :data:`LOG_MAX_BYTES`."""
    logger = logging.getLogger(name)
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS,
                                                       encoding="utf-8")
        handler.terminator = ""
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


class LambdaEnvironment:
    """One child process running :mod:`infra.twin.lambda_runtime`."""

    def __init__(self, index: int, processes: ProcessGroup, env: dict[str, str], log: logging.Logger,
                 log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        self.proc = processes.start(f"lambda-{index}", [sys.executable, "-m", "infra.twin.lambda_runtime"],
                                    env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        self.processes = processes
        self.ready: dict[str, Any] | None = None
        self._buffer = b""
        self._pump = threading.Thread(target=self._copy_output, args=(log,), name=f"lambda-{index}-log", daemon=True)
        self._pump.start()

    def _copy_output(self, log: logging.Logger) -> None:
        """The function's stderr into the shared rotating log, line by line as it comes."""
        for line in iter(self.proc.stderr.readline, b""):
            log.info("%s", line.decode("utf-8", "replace"))

    def _read_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the environment (read straight from the pipe: two lines may come at once)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                raise LambdaError(f"the execution environment exited ({self.proc.poll()}): "
                                  f"{tail(self.log_path, 600)}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        doc = self._read_line(timeout)
        if not doc.get("ready"):
            raise LambdaError(f"init failed: {doc.get('errorType')}: {doc.get('errorMessage')}")
        self.ready = doc
        return doc

    def hand_over(self, event: dict[str, Any], timeout: float) -> None:
        """Give the event to the function; :class:`NotDelivered` if the environment never took it."""
        try:
            self.proc.stdin.write(json.dumps(event).encode() + b"\n")
            self.proc.stdin.flush()
            doc = self._read_line(timeout)
        except (BrokenPipeError, ConnectionResetError, LambdaError) as exc:
            raise NotDelivered(str(exc)) from None
        if doc != {"taken": True}:
            raise LambdaError(f"the execution environment answered out of turn: {str(doc)[:200]}")

    def result(self, timeout: float) -> dict[str, Any]:
        return self._read_line(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop(self.proc, grace=3.0)
        self.processes.forget(self.proc)
        self._pump.join(2.0)


class LambdaPool:
    """A fixed number of warm execution environments; a broken one is replaced by a cold start."""

    def __init__(self, size: int, env: dict[str, str], processes: ProcessGroup, log_dir: Path) -> None:
        self.size = max(1, size)
        self.env = env
        self.processes = processes
        self.log_dir = Path(log_dir)
        self._idle: queue.Queue[LambdaEnvironment] = queue.Queue()
        self._all: list[LambdaEnvironment] = []
        self._counter = 0
        self._lock = threading.Lock()
        self.cold_starts = 0
        self.redelivered = 0  # events handed to another environment after the first one was gone
        self._log: logging.Logger | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / "lambda.log"

    def _spawn(self) -> LambdaEnvironment:
        with self._lock:
            self._counter += 1
            n = self._counter
        # Each environment has its own /tmp in Lambda; here its own model cache folder.
        env_vars = dict(self.env)
        if env_vars.get("MODEL_CACHE_DIR"):
            env_vars["MODEL_CACHE_DIR"] = str(Path(env_vars["MODEL_CACHE_DIR"]) / f"env-{n}")
        env = LambdaEnvironment(n, self.processes, env_vars, self._log, self.log_path)
        with self._lock:
            self._all.append(env)
            self.cold_starts += 1
        return env

    def start(self) -> LambdaPool:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = rotating_logger(f"cxr.twin.lambda.{id(self)}", self.log_path)
        envs = [self._spawn() for _ in range(self.size)]
        deadline = time.monotonic() + ENV_START_TIMEOUT
        for env in envs:
            env.wait_ready(deadline - time.monotonic())
            self._idle.put(env)
        return self

    def _replace(self, broken: LambdaEnvironment) -> None:
        broken.stop()
        with self._lock:
            if broken in self._all:
                self._all.remove(broken)

        def cold_start() -> None:
            try:
                fresh = self._spawn()
                fresh.wait_ready(ENV_START_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - logged; the pool runs one short until the next failure
                LOG.error("could not start a new execution environment: %s", exc)
                return
            self._idle.put(fresh)

        threading.Thread(target=cold_start, name="lambda-cold-start", daemon=True).start()

    def _take(self, deadline: float) -> LambdaEnvironment:
        """A live idle environment; dead ones met on the way are replaced."""
        while True:
            try:
                env = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("no execution environment became free") from None
            if env.alive:
                return env
            LOG.warning("execution environment %d died while idle; starting another", env.index)
            self._replace(env)

    def invoke(self, event: dict[str, Any], timeout: float = 29.0) -> dict[str, Any]:
        """The function's response to ``event``.

        Raises :class:`TimeoutError` when no environment is free or the function does not answer
        within ``timeout`` seconds (API Gateway's 504), :class:`LambdaError` (or ``OSError`` /
        ``ValueError`` on a garbled answer) when the function failed with the event (502).
        """
        deadline = time.monotonic() + timeout
        while True:
            env = self._take(deadline)
            try:
                env.hand_over(event, deadline - time.monotonic())
            except NotDelivered as exc:
                LOG.warning("execution environment %d was gone before it took the event (%s); handing it to "
                            "another", env.index, str(exc)[:200])
                self.redelivered += 1
                self._replace(env)
                continue
            except (TimeoutError, LambdaError, OSError, ValueError):
                self._replace(env)
                raise
            break
        try:
            result = env.result(deadline - time.monotonic())
        except (TimeoutError, LambdaError, OSError, ValueError):
            self._replace(env)
            raise
        self._idle.put(env)
        return result

    def stop(self) -> None:
        with self._lock:
            envs, self._all = list(self._all), []
        for env in envs:
            env.stop()
        if self._log is not None:
            close_logger(self._log)
