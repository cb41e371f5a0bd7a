"""The operator's commands against a running twin, run as an operator runs them (subprocesses).

One twin is started with ``python -m infra.twin --serve-only`` on pinned ports; every check runs
``python -m infra.upload|promote|batch_predict`` or ``training_job.evaluate`` against it and reads
what they print: credentials required and browsers refused, endpoints pinned and read from the
state folder, each wrong-endpoint mistake named, a second twin refused in one line before it
starts anything, uploads never silently ignored, batch location rules, the evaluated split named.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_twin_support import call, subset

from infra.twin.processes import free_port

START_TIMEOUT = 300.0
PY = sys.executable


def run(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bundle_archive):
    state = tmp_path_factory.mktemp("op-state")
    log = state.parent / "op-twin.log"
    s3_port, control_port = free_port(offset=10000), free_port()
    cmd = [PY, "-m", "infra.twin", "--serve-only", "--state-dir", str(state), "--reference", str(tiny_bundle_archive),
           "--concurrency", "1", "--s3-port", str(s3_port), "--control-port", str(control_port),
           "--serve-seconds", "900"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + START_TIMEOUT
    while "serving on" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    info = json.loads((state / "twin.json").read_text())
    yield {"proc": proc, "state": state, "log": log, "info": info, "s3_port": s3_port,
           "control_port": control_port, "cmd": cmd}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def twin_args(served) -> list[str]:
    return ["--twin", "--state-dir", str(served["state"])]


def test_servers_require_the_printed_credentials_and_refuse_browsers(served):
    import boto3
    from botocore.exceptions import ClientError

    info, text = served["info"], served["log"].read_text()
    state_file = served["state"] / "twin.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert f"AWS_ACCESS_KEY_ID={info['access_key_id']}" in text and info["secret_access_key"] in text
    for service, url, call_it in (("s3", info["s3_endpoint"], lambda c: c.list_buckets()),
                                  ("ssm", info["control_endpoint"], lambda c: c.describe_parameters())):
        wrong = boto3.client(service, endpoint_url=url, region_name="us-east-1", aws_access_key_id="AKIAWRONG",
                             aws_secret_access_key="x" * 40)
        with pytest.raises(ClientError):
            call_it(wrong)
        forged = boto3.client(service, endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=info["access_key_id"], aws_secret_access_key="y" * 40)
        with pytest.raises(ClientError):
            call_it(forged)
        # A web page: a cross-origin preflight and a simple POST, neither answered with CORS.
        for method, headers in (("OPTIONS", {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"}),
                                ("POST", {"Origin": "http://evil.example", "Content-Type": "text/plain"})):
            try:
                status, got, _ = call(url + "/", method, b"x" if method == "POST" else None, headers, timeout=10)
            except ConnectionError:  # closed without an answer: refused too
                status, got = 403, {}
            assert status in (403, 405) and "access-control-allow-origin" not in got, (service, method, status, got)


def test_endpoints_are_pinned_and_operator_commands_read_them_from_the_state_folder(served):
    info = served["info"]
    assert info["s3_endpoint"].endswith(f":{served['s3_port']}")
    assert info["control_endpoint"].endswith(f":{served['control_port']}")
    listed = run("-m", "infra.promote", *twin_args(served), "list")
    assert listed.returncode == 0, listed.stderr
    assert "in service:" in listed.stdout


def test_each_wrong_endpoint_names_the_mistake(served):
    info, base = served["info"], ["-m", "infra.promote", "--state-dir", str(served["state"])]
    stale = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    p = run(*base, "--s3-endpoint-url", stale, "list")
    assert p.returncode == 1 and time.monotonic() - t0 < 6.0
    assert "nothing answers at" in one_line_error(p) and "twin.json" in p.stderr
    p = run(*base, "--s3-endpoint-url", info["api_url"].rstrip("/"), "list")
    assert p.returncode == 1 and "is the twin's API" in one_line_error(p)
    p = run(*base, "--s3-endpoint-url", info["control_endpoint"], "--control-endpoint-url", info["s3_endpoint"], "list")
    assert p.returncode == 1 and "swapped" in one_line_error(p)
    p = run(*base, "--s3-endpoint-url", info["s3_endpoint"].removeprefix("http://"), "list")
    assert p.returncode == 1 and "write it as http://" in one_line_error(p)
    p = run("-m", "infra.upload", "--data", str(served["state"]), "--name", "x", "--bucket", "b",
            "--endpoint-url", stale)
    assert p.returncode == 1 and "nothing answers at" in one_line_error(p)


def test_a_second_twin_is_refused_in_one_line_before_starting_anything(served, tmp_path):
    p = run(*served["cmd"][1:], timeout=60)
    assert p.returncode == 1 and "in use by another twin" in one_line_error(p)
    assert "S3 (SeaweedFS)" not in p.stdout and "goroutine" not in p.stderr
    other = [*served["cmd"][1:]]
    other[other.index("--state-dir") + 1] = str(tmp_path / "other")
    p = run(*other, timeout=60)
    assert p.returncode == 1 and f"port {served['s3_port']}" in one_line_error(p) and "already in use" in p.stderr
    assert "S3 (SeaweedFS)" not in p.stdout


def test_serve_only_says_an_upload_is_not_trained_and_leaves_it_for_the_next_start(served, tmp_path):
    data = subset(tmp_path / "late", per_class=6)
    p = run("-m", "infra.upload", *twin_args(served), "--data", str(data), "--name", "late")
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + 30
    while "not training" not in served["log"].read_text():
        assert time.monotonic() < deadline, served["log"].read_text()[-2000:]
        time.sleep(0.5)
    line = next(x for x in served["log"].read_text().splitlines() if "not training" in x)
    assert "datasets/late/_READY" in line and "the next start without --serve-only will" in line
    assert not list((served["state"] / "executions").glob("*.json"))  # nothing ran, so the next start runs it


def test_batch_enforces_the_cloud_locations_and_refuses_empty_or_local(served, tmp_path):
    info = served["info"]
    data, art = info["data_bucket"], info["artifacts_bucket"]
    from infra.twin.endpoints import read_state, twin_clients

    s3, = twin_clients(read_state(served["state"]), "s3")
    img = next((ROOT.parent / "shared" / "data" / "chest_xray_224" / "test" / "NORMAL").iterdir())
    s3.put_object(Bucket=data, Key="incoming/b1/a.jpeg", Body=img.read_bytes())
    base = ["-m", "infra.batch_predict", *twin_args(served), "--input", f"s3://{data}/incoming/b1/"]
    cases = {f"s3://{art}/out.csv": f"must be under s3://{data}/batch/",
             f"s3://{data}/incoming/b1/out.csv": f"must be under s3://{data}/batch/",
             "s3://no-such-bucket/batch/out.csv": "must be under",
             str(tmp_path / "out.csv"): "is not an s3:// URI"}
    for output, expected in cases.items():
        p = run(*base, "--output", output)
        assert p.returncode == 1 and expected in one_line_error(p), (output, p.stderr)
    p = run("-m", "infra.batch_predict", *twin_args(served), "--input", f"s3://{data}/batch/",
            "--output", f"s3://{data}/batch/x.csv")
    assert p.returncode == 1 and "inside the input prefix" in one_line_error(p)
    p = run("-m", "infra.batch_predict", *twin_args(served), "--input", f"s3://{data}/incomming/b1/",
            "--output", f"s3://{data}/batch/x.csv")
    assert p.returncode == 1 and "no objects under" in one_line_error(p)
    p = run(*base, "--output", f"s3://{data}/batch/b1.csv")
    assert p.returncode == 0 and "wrote 1 rows" in p.stdout, p.stderr


def test_evaluate_names_the_split_and_warns_on_train(tmp_path, tiny_bundle_archive):
    data = subset(tmp_path / "trainonly", per_class=4)
    p = run("-m", "training_job.evaluate", "--bundle", str(tiny_bundle_archive), "--data", str(data),
            "--out", str(tmp_path / "eval"))
    assert p.returncode == 0, p.stderr
    assert "(train/)" in p.stdout and "TRAINING images" in p.stderr
