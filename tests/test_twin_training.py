"""The twin's training job runner: its log survives a crash of the twin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

# A stand-in for the training entrypoint: five epoch lines, a file after each, then it waits.
EPOCHS = """
import pathlib, sys, time
for i in range(1, 6):
    print(f"epoch={i} train_loss=0.{i} val_loss=0.{i} val_auc=0.9{i} val_acc=0.9{i} lr=0.001", flush=True)
    pathlib.Path(sys.argv[1], f"epoch-{i}").touch()
    time.sleep(0.1)
time.sleep(120)
"""

# What the twin does for a job, in a process of its own so that it can be killed.
DRIVER = """
import os, pathlib, sys
from infra.twin.processes import ProcessGroup
from infra.twin.training import LocalTrainingJob
log_dir, marks = pathlib.Path(sys.argv[1]), sys.argv[2]
job = LocalTrainingJob(hyperparameters={}, processes=ProcessGroup(), log_dir=log_dir, echo=False)
job._run([sys.executable, "-c", sys.argv[3], marks], log_dir, dict(os.environ), log_dir / "job.log", None, None)
"""


def test_the_training_log_keeps_every_epoch_line_after_a_kill_9_of_the_twin(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(marks), EPOCHS], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / "epoch-5").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (marks / "epoch-5").exists(), "the stand-in job did not get through its epochs"
        time.sleep(0.3)  # the twin reads the last line
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
    lines = (tmp_path / "job.log").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == [f"epoch={i}" for i in range(1, 6)]
    # The job itself does not outlive the twin (it is asked to exit when its parent dies).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any("time.sleep(120)" in _cmdline(p) for p in os.listdir("/proc")
                                               if p.isdigit()):
        time.sleep(0.2)
    assert not any("time.sleep(120)" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode("utf-8", "replace")
    except OSError:
        return ""
