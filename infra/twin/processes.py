"""Child processes the twin owns: started on loopback ports, waited for with bounds, always stopped.

Every child runs in its own process group (so one terminal Ctrl-C reaches the twin, which then
stops its children in order) and, on Linux, is asked by the kernel to exit when the twin dies,
even if the twin is killed with SIGKILL and never reaches its ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"

_PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class _Spawner:
    """Starts every child from one long-lived thread.

    The kernel sends the parent-death signal when the *thread* that forked the child exits, so a
    child started from a short-lived thread (a request handler, a cold start) would be killed
    with it. This thread lives as long as the twin's process.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box.append((False, exc))
            done.set()

    def run(self, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="twin-spawner", daemon=True)
                self._thread.start()
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        if not done.wait(60):
            raise RuntimeError("could not start a child process in 60 s")
        ok, value = box[0]
        if not ok:
            raise value
        return value


_SPAWNER = _Spawner()


def free_port(avoid: set[int] | None = None, offset: int = 0) -> int:
    """A TCP port on loopback that is free now (and, with ``offset``, whose ``port + offset`` is too).

    SeaweedFS derives each gRPC port as the HTTP port + 10000, so its ports are taken in pairs.
    """
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port in avoid or (offset and (port + offset > 65535 or port + offset in avoid)):
            continue
        if offset and not port_is_free(port + offset):
            continue
        return port
    raise RuntimeError("no free loopback port found")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2,
               alive: Callable[[], str | None] | None = None) -> None:
    """Poll ``check`` until it is true; raise with ``what`` after ``timeout`` seconds or if ``alive`` reports death."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs only
            return r.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500


class ProcessGroup:
    """The children the twin started; :meth:`stop_all` ends them newest first."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None, stdin: Any = subprocess.DEVNULL,
              stdout: IO | int | None = None, stderr: IO | int | None = None) -> subprocess.Popen:
        proc = _SPAWNER.run(lambda: subprocess.Popen(  # noqa: S603 - fixed argument lists, no shell
            list(map(str, cmd)), env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
            process_group=0, preexec_fn=_die_with_parent if _prctl is not None else None,
        ))
        self._procs.append((name, proc))
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    @property
    def running(self) -> list[tuple[str, int]]:
        return [(n, p.pid) for n, p in self._procs if p.poll() is None]

    def stop_all(self, grace: float = 8.0) -> None:
        while self._procs:
            name, proc = self._procs.pop()
            stop(proc, grace)


def stop(proc: subprocess.Popen, grace: float = 8.0) -> int | None:
    """SIGTERM to the child's process group, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


def tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")
