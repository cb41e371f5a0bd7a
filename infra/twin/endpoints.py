"""Where a running twin is, for the operator commands: its state file and the endpoint checks.

The twin writes ``twin.json`` (mode 0600) into its state folder at every start: the S3 and
control-plane endpoints, the API's URL, the buckets and the credentials its servers require
(random per start). ``python -m infra.upload|promote|batch_predict --twin`` read it (from
``--state-dir``, default ``.twin``); ``--s3-endpoint-url`` / ``--control-endpoint-url`` override the
endpoints it names. Before any AWS call each endpoint is checked in about a second, so a stale
URL, the API's URL, swapped endpoints or a missing ``http://`` get one line naming the mistake
instead of a retry loop and a generic network error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ROOT
from .auth import SERVER_HEADER, Credentials

STATE_FILE = "twin.json"
DEFAULT_STATE_DIR = ROOT / ".twin"
PROBE_SECONDS = 2.0


class TwinEndpointError(RuntimeError):
    """An endpoint or the state file is not what the command needs; the message says which and why."""


@dataclass
class TwinState:
    s3_endpoint: str
    control_endpoint: str
    api_url: str
    data_bucket: str
    artifacts_bucket: str
    access_key_id: str
    secret_access_key: str
    pid: int

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.access_key_id, self.secret_access_key)


def write_state(state_dir: Path, state: TwinState) -> Path:
    """Write ``STATE_DIR/twin.json`` atomically, readable by its owner only."""
    path = Path(state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)
    os.replace(tmp, path)
    return path


def read_state(state_dir: Path) -> TwinState:
    """The state file of the twin that last started with ``state_dir``.

    Raises :class:`TwinEndpointError` when there is none or it is unreadable."""
    path = Path(state_dir) / STATE_FILE
    try:
        doc = json.loads(path.read_text())
        return TwinState(**{k: doc[k] for k in TwinState.__dataclass_fields__})
    except FileNotFoundError:
        raise TwinEndpointError(f"no running twin found: {path} does not exist (start one with "
                                "`.venv/bin/python -m infra.twin`, or pass the --state-dir it was started with)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TwinEndpointError(f"{path} is not a twin state file ({exc}): start the twin again") from None


def add_twin_arguments(parser: argparse.ArgumentParser, endpoints: bool = True) -> None:
    """``--twin``, ``--state-dir`` and (with ``endpoints``) ``--s3-endpoint-url`` / ``--control-endpoint-url``."""
    g = parser.add_argument_group("local twin")
    g.add_argument("--twin", action="store_true",
                   help="act on the running local twin: its endpoints and credentials come from STATE_DIR/twin.json")
    g.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"the twin's state folder (default: {DEFAULT_STATE_DIR.name}/ in the repository)")
    if endpoints:
        g.add_argument("--s3-endpoint-url", help="the twin's S3 endpoint (default with --twin: twin.json's)")
        g.add_argument("--control-endpoint-url",
                       help="the twin's SSM/SageMaker endpoint (default with --twin: twin.json's)")


def twin_state_for(args: argparse.Namespace) -> TwinState | None:
    """The twin the command acts on (None: the cloud), with its endpoints checked.

    Any of ``--twin``, ``--s3-endpoint-url``, ``--control-endpoint-url`` selects the twin; the
    credentials always come from its state file. Raises :class:`TwinEndpointError`."""
    s3_url, control_url = getattr(args, "s3_endpoint_url", None), getattr(args, "control_endpoint_url", None)
    if not (args.twin or s3_url or control_url):
        return None
    state = read_state(args.state_dir)
    state.s3_endpoint = check_endpoint(s3_url or state.s3_endpoint, "s3", "--s3-endpoint-url", args.state_dir)
    state.control_endpoint = check_endpoint(control_url or state.control_endpoint, "control",
                                            "--control-endpoint-url", args.state_dir)
    return state


def _kind(url: str) -> str:
    """Which of the twin's servers answers at ``url``: s3, control, api, or other."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=PROBE_SECONDS) as r:  # noqa: S310 - loopback
            headers = r.headers
    except urllib.error.HTTPError as exc:
        headers = exc.headers
    except OSError:
        return "other"
    if headers.get(SERVER_HEADER) == "control-plane":
        return "control"
    if headers.get("X-Amz-Request-Id"):
        return "s3"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=PROBE_SECONDS) as r:  # noqa: S310
            if "status" in json.loads(r.read() or b"{}"):
                return "api"
    except (OSError, ValueError):
        pass
    return "other"


_NAMES = {"s3": "S3 endpoint", "control": "control-plane endpoint (SSM, SageMaker, SNS)",
          "api": "API (POST /predict)", "other": "server"}


def check_endpoint(url: str, want: str, option: str, state_dir: Path | None = None) -> str:
    """``url`` when it is the twin's ``want`` server ("s3" or "control"); else
    :class:`TwinEndpointError` naming the likely mistake. Takes at most a few seconds."""
    hint = (f" ({Path(state_dir) / STATE_FILE} has the current ones; --twin reads them)" if state_dir else "")
    if not re.match(r"^https?://", url):
        raise TwinEndpointError(f"{option} {url} has no scheme: write it as http://{url}")
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        raise TwinEndpointError(f"{option} {url} is not a URL with a valid port") from None
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            pass
    except OSError:
        raise TwinEndpointError(f"nothing answers at {url} ({option}): the twin is not running there; its endpoints "
                                f"change at every start unless pinned with --s3-port/--control-port{hint}") from None
    kind = _kind(url)
    if kind == want or kind == "other":
        return url
    swapped = " (are --s3-endpoint-url and --control-endpoint-url swapped?)" if kind in ("s3", "control") else ""
    raise TwinEndpointError(f"{option} {url} is the twin's {_NAMES[kind]}, not its {_NAMES[want]}{swapped}{hint}")


def twin_clients(state: TwinState, *services: str) -> list[Any]:
    """boto3 clients for ``services`` ("s3" on the S3 endpoint, others on the control plane)."""
    from .servers import client

    return [client(s, state.s3_endpoint if s == "s3" else state.control_endpoint, state.credentials)
            for s in services]
