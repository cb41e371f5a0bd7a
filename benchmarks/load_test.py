"""Load test of the local twin's API: POST /predict from 1 to 200 concurrent clients, loopback only.

    python benchmarks/load_test.py                              # starts its own twin (serve-only)
    python benchmarks/load_test.py --url http://127.0.0.1:PORT/ --api-key KEY
    python benchmarks/load_test.py --levels 1,4 --requests 40 --out /tmp/load.md

Without ``--url`` it starts ``python -m infra.twin --serve-only`` in a temporary state folder (so
the shipped reference model serves) and stops it at the end. Each level sends a fixed number of
requests (``--requests``), bounded also in time (``--max-seconds``), from that many client threads,
each on its own keep-alive connection, after a short warm-up that is not counted. A client told
429 (throttled) or 503 (too many connections) waits the ``Retry-After`` it is given, as a
well-behaved client does, and goes on. The table (answers by kind, the 429 and 503 shares,
throughput of predictions, median and 99th-percentile latency of the 200s, errors) is printed and
written to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_IMAGE = DATA / "chest_xray_224" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
RESULTS = ROOT / "benchmarks" / "results" / "load.md"
START_TIMEOUT = 240.0
REQUEST_TIMEOUT = 60.0


@dataclass
class Level:
    clients: int
    requests: int = 0  # answered 200
    throttled: int = 0  # 429
    unavailable: int = 0  # 503
    errors: int = 0  # anything else: another status or a failed connection
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.requests + self.throttled + self.unavailable + self.errors

    def share(self, n: int) -> str:
        return f"{100.0 * n / self.sent:.1f} %" if self.sent else "-"

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
        return xs[k]


class Client:
    """One keep-alive connection to the API."""

    def __init__(self, url: str, api_key: str, body: bytes, content_type: str):
        u = urlsplit(url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"{url}: the load test only talks to loopback")
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path.rstrip("/") or "") + "/predict"
        self.headers = {"x-api-key": api_key, "Content-Type": content_type}
        self.body = body
        self.conn: http.client.HTTPConnection | None = None

    def post(self) -> tuple[int, float, float]:
        """(status, latency in ms, seconds the server asked to wait before the next request)."""
        t0 = time.perf_counter()
        for attempt in (1, 2):  # a keep-alive connection the server closed is reopened once
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)
                self.conn.request("POST", self.path, body=self.body, headers=self.headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.status == 200:
                    json.loads(data)["label"]  # noqa: B018 - a 200 must carry a prediction
                elif r.status in (429, 503):
                    json.loads(data)["error"]["code"]  # noqa: B018 - refusals are JSON too
                if r.will_close:
                    self.close()
                wait = float(r.headers.get("Retry-After") or 0) if r.status in (429, 503) else 0.0
                return r.status, (time.perf_counter() - t0) * 1000.0, wait
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_level(url: str, api_key: str, body: bytes, content_type: str, clients: int, requests: int,
              max_seconds: float, warmup: int = 2) -> Level:
    level = Level(clients)
    lock = threading.Lock()
    remaining = [requests]
    conns = [Client(url, api_key, body, content_type) for _ in range(clients)]
    for c in conns:  # warm-up: open connections, touch every execution environment
        for _ in range(warmup):
            try:
                c.post()
            except Exception:  # noqa: BLE001 - counted below if it persists
                c.close()
    deadline = time.monotonic() + max_seconds
    start = threading.Barrier(clients + 1)

    def worker(c: Client) -> None:
        start.wait()
        while True:
            with lock:
                if remaining[0] <= 0 or time.monotonic() >= deadline:
                    return
                remaining[0] -= 1
            try:
                status, ms, wait = c.post()
            except Exception as exc:  # noqa: BLE001 - every failure is an error in the table
                c.close()
                with lock:
                    level.errors += 1
                    level.statuses[type(exc).__name__] = level.statuses.get(type(exc).__name__, 0) + 1
                continue
            with lock:
                level.statuses[str(status)] = level.statuses.get(str(status), 0) + 1
                if status == 200:
                    level.requests += 1
                    level.latencies_ms.append(ms)
                elif status == 429:
                    level.throttled += 1
                elif status == 503:
                    level.unavailable += 1
                else:
                    level.errors += 1
            if wait:
                time.sleep(min(wait, 5.0))

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max_seconds + REQUEST_TIMEOUT)
    level.seconds = time.perf_counter() - t0
    for c in conns:
        c.close()
    return level


def table(levels: list[Level]) -> str:
    base = next((lv.throughput for lv in levels if lv.clients == 1), None)
    lines = ["| clients | requests | 200 | 429 share | 503 share | errors | throughput (200/s) | vs 1 client "
             "| p50 (ms) | p99 (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        ratio = f"{lv.throughput / base:.2f}x" if base else "-"
        lines.append(f"| {lv.clients} | {lv.sent} | {lv.requests} | {lv.share(lv.throttled)} | "
                     f"{lv.share(lv.unavailable)} | {lv.errors} | {lv.throughput:.1f} | {ratio} | "
                     f"{lv.percentile(50):.1f} | {lv.percentile(99):.1f} |")
    return "\n".join(lines) + "\n"


class TwinProcess:
    """``python -m infra.twin --serve-only`` in a temporary state folder, stopped with SIGINT."""

    def __init__(self, concurrency: int, state_dir: Path):
        self.log = open(state_dir / "twin.out", "w+")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(  # noqa: S603 - fixed command
            [sys.executable, "-m", "infra.twin", "--serve-only", "--state-dir", str(state_dir),
             "--concurrency", str(concurrency)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = self.api_key = self.model = ""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            m_url = re.search(r"^API\s+(http://\S+)", text, re.M)
            m_key = re.search(r"^API key\s+(\S+)", text, re.M)
            if m_url and m_key and "serving on" in text:
                self.url, self.api_key = m_url.group(1), m_key.group(1)
                m = re.search(r"^in service\s+(.+)$", text, re.M)
                self.model = m.group(1) if m else ""
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the twin did not start:\n{Path(self.log.name).read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 2)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="the API's base URL (loopback); default: start a twin")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--levels", default="1,4,16,64,200", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=600, help="requests per level (after warm-up)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per level")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--concurrency", type=int, default=4, help="execution environments of a twin started here")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown report ('-' for none)")
    args = ap.parse_args(argv)

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    body = args.image.read_bytes()
    content_type = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    twin = None
    tmp = None
    try:
        if args.url:
            url, key, model = args.url, args.api_key, "(external)"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="cxr-load-")
            twin = TwinProcess(args.concurrency, Path(tmp.name))
            url, key, model = twin.url, twin.api_key, twin.model
        results = []
        for n in levels:
            lv = run_level(url, key, body, content_type, n, args.requests, args.max_seconds)
            results.append(lv)
            print(f"{n:>3} clients: {lv.requests} ok, {lv.throttled} throttled, {lv.unavailable} unavailable, "
                  f"{lv.errors} errors, {lv.throughput:.1f} req/s, "
                  f"p50 {lv.percentile(50):.1f} ms, p99 {lv.percentile(99):.1f} ms {lv.statuses}", flush=True)
    finally:
        if twin is not None:
            twin.stop()
        if tmp is not None:
            tmp.cleanup()

    md = table(results)
    print(md)
    if str(args.out) != "-":
        load = os.getloadavg()
        head = (
            "# Load test of the local twin's API\n\n"
            f"`python benchmarks/load_test.py --levels {args.levels} --requests {args.requests}` on "
            f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}: {os.cpu_count()} CPU cores "
            f"({platform.machine()}, shared; load average {load[0]:.1f} at the end), "
            f"{args.concurrency} Lambda execution environments with one ONNX Runtime thread each."
            + (f" Run at nice {os.nice(0)} on a machine busy with other work (a training run, other test "
               "suites): the figures are lower and noisier than on an idle machine." if os.nice(0) > 0 else "")
            + "\n\n"
            f"Each request: `POST /predict` with `{args.image.name}` ({len(body) // 1024} KB JPEG, 224 x 224), "
            f"no heatmap, through the local API Gateway (API key checked, proxy event, base64 body) to the "
            f"inference handler. Model in service: {model}.\n\n"
            "Every client holds one keep-alive connection and sends its next request when the last one is "
            "answered (after the `Retry-After` it was given, on a 429 or 503); throughput counts 200 answers "
            "over the level's wall time, after a warm-up of two requests per client; p50 and p99 are of the "
            "200 answers. The API lets 128 requests wait for or run in the function at once (more get 429 "
            "`THROTTLED`) and holds 1,000 connections (more get 503 `TOO_MANY_CONNECTIONS`). Errors: any "
            "other answer or a failed connection.\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(head + md)
    return 1 if any(lv.errors for lv in results) else 0


if __name__ == "__main__":
    sys.exit(main())
