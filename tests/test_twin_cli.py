"""``python -m infra.twin`` as a user runs it: the demo end to end, its API, its page in a browser,
a load test against it, Ctrl-C, and a second run that reuses what the first one left.

The twin runs as a subprocess on a small real dataset with the tiniest training and gate
thresholds a tiny model clears; the shipped reference is stood in for by the session's tiny
bundle.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, original_images
from test_twin_support import LOW_GATE, TINY_HP, call, call_json, subset

from infra.twin.cli import main as twin_main

START_TIMEOUT = 420.0
ARTIFACTS = ROOT / ".twin" / "artifacts"


@dataclass
class Running:
    proc: subprocess.Popen
    cmd: list[str]
    log: Path
    state: Path
    url: str
    key: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def twin_command(data: Path, state: Path, reference: Path) -> list[str]:
    cmd = [sys.executable, "-m", "infra.twin", "--data", str(data), "--state-dir", str(state),
           "--reference", str(reference), "--concurrency", "2", "--gate-require-improvement", "false"]
    for k, v in TINY_HP.items():
        cmd += ["--hp", f"{k}={v}"]
    for k, v in LOW_GATE.items():
        cmd += ["--gate-threshold", f"{k}={v}"]
    return cmd


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ONCE"}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().split(") ", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_bundle_archive):
    tmp = tmp_path_factory.mktemp("twin-cli")
    data = subset(tmp / "chest_xray", 30)
    state = tmp / "state"
    cmd = twin_command(data, state, tiny_bundle_archive)
    log = tmp / "twin.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "serving on" in text or proc.poll() is not None:
            break
        time.sleep(0.5)
    if "serving on" not in text:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the twin did not come up (exit {proc.poll()}):\n{text[-4000:]}")
    url = re.search(r"^API\s+(http://127\.0\.0\.1:\d+/)", text, re.M).group(1)
    key = re.search(r"^API key\s+(\S+)", text, re.M).group(1)
    r = Running(proc, cmd, log, state, url, key)
    yield r
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_without_a_dataset_it_names_the_public_one(tmp_path, capsys):
    assert twin_main(["--data", str(tmp_path / "nowhere"), "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "Chest X-Ray Images (Pneumonia)" in err and "--data" in err
    assert not (tmp_path / "s").exists()


def test_the_demo_trains_promotes_and_prints_a_prediction(running):
    text = running.text()
    assert "S3 (SeaweedFS)        http://127.0.0.1:" in text
    assert "upload      60 uploaded, 0 already there; marker written" in text
    assert re.search(r"^run\s+cxr-chest-xray-\w+: SUCCEEDED via ValidateDataset -> TrainModel -> EvaluateModel -> "
                     r"QualityGate -> RegisterModel -> IsApproved -> PromoteModel -> NotifyPromoted$", text, re.M), text
    # No test/ split in this upload: the output says what the model was judged on.
    assert re.search(r"^judged on\s+its own validation split only", text, re.M), text
    promoted = re.search(r"^outcome\s+promoted: model (\S+) cleared the gate", text, re.M).group(1)
    predictions = re.findall(r"^prediction\s+POST /predict \S+ \(folder label \w+\) -> (NORMAL|PNEUMONIA)\s+"
                             r"P\(pneumonia\)=[0-9.]+ threshold=[0-9.]+\s+model (\S+)$", text, re.M)
    assert [v for _, v in predictions] == ["test-tiny-0001", promoted], text
    services = re.findall(r"^in service\s+(.+)$", text, re.M)
    assert "the shipped reference model" in services[0] and services[-1].startswith(promoted)
    assert f"x-api-key: {running.key}" in text


def test_the_api_needs_its_key_and_answers_with_the_promoted_model(running):
    raw = original_images()[0].read_bytes()
    status, doc = call_json(running.url + "predict", "POST", raw, {"Content-Type": "image/jpeg"})
    assert status == 403 and doc["message"] == "Forbidden"
    status, doc = call_json(running.url + "predict", "POST", raw,
                            {"Content-Type": "image/jpeg", "x-api-key": running.key + "x"})
    assert status == 403
    status, doc = call_json(running.url + "predict?explain=1", "POST", raw,
                            {"Content-Type": "image/jpeg", "x-api-key": running.key})
    assert status == 200 and doc["label"] in ("NORMAL", "PNEUMONIA")
    assert doc["model"]["version"] != "test-tiny-0001"
    assert base64.b64decode(doc["heatmap_png_base64"])[:4] == b"\x89PNG"
    status, health = call_json(running.url + "health")
    assert status == 200 and health["model"]["version"] == doc["model"]["version"]


def _chromium(tmp_path: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        why = ("Debian's chromium and chromium-driver are not installed "
               "(apt-get install -y chromium chromium-driver)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why + "; CI must install them")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,1500", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)


def test_the_page_in_headless_chromium(running, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = original_images()[-1]  # a full-size original
    browser = _chromium(tmp_path)
    try:
        browser.set_page_load_timeout(60)
        browser.get(running.url)
        browser.find_element(By.ID, "apikey").send_keys(running.key)
        chooser = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].style.display = 'block';", chooser)
        chooser.send_keys(str(image))
        browser.execute_script("arguments[0].style.display = 'none';", chooser)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 90).until(
            lambda b: b.find_element(By.ID, "label").text.strip() or "error" in
            (b.find_element(By.ID, "status").get_attribute("class") or ""))
        status = browser.find_element(By.ID, "status")
        assert "error" not in (status.get_attribute("class") or ""), status.text
        assert browser.find_element(By.ID, "label").text in ("NORMAL", "PNEUMONIA")
        heatmap = browser.find_element(By.ID, "heatmap")
        assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "var i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0;"))
        assert heatmap.is_displayed()
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert shot.read_bytes()[:4] == b"\x89PNG"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "page.png")


def test_a_tiny_load_test_has_no_errors(running, tmp_path):
    out = tmp_path / "load.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--url", running.url,
                           "--api-key", running.key, "--levels", "1,4", "--requests", "16", "--max-seconds", "60",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) % \| ([\d.]+) % \| (\d+) \|", out.read_text(), re.M)
    # clients, requests, 200s, 429 share, 503 share, errors
    assert rows == [("1", "16", "16", "0.0", "0.0", "0"), ("4", "16", "16", "0.0", "0.0", "0")], out.read_text()


def test_ctrl_c_stops_every_process_it_started(running):
    children = children_of(running.proc.pid)
    assert len(children) >= 3  # SeaweedFS and the execution environments (moto is a thread)
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(timeout=90) == 130
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)]
    assert "stopped: every server and process the twin started has exited" in running.text()
    with pytest.raises(OSError):  # nothing listens there any more
        call(running.url + "health", timeout=2)


def test_a_second_run_reuses_the_data_and_the_promoted_model(running):
    assert running.proc.poll() is not None, "runs after the Ctrl-C test"
    first = running.text()
    promoted = re.search(r"^outcome\s+promoted: model (\S+)", first, re.M).group(1)
    proc = subprocess.run(running.cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(ONCE="1"))
    text = proc.stdout
    assert proc.returncode == 0, text + proc.stderr
    assert "upload      0 uploaded, 60 already there; marker unchanged" in text
    assert "none started: this marker version already ran" in text
    assert "training job" not in text
    assert re.search(rf"^in service\s+{re.escape(promoted)}, promoted", text, re.M), text
    assert re.search(rf"^prediction .* model {re.escape(promoted)}$", text, re.M), text
