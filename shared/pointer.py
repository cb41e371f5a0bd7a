"""The promoted-model pointer: the one value promotion changes and serving reads.

In the cloud it is an SSM parameter; in the local twin the same JSON lives in the same place
(moto's SSM on loopback). Its value::

    {"model_uri": "s3://bucket/models/.../model.tar.gz", "sha256": "<of model.tar.gz>",
     "model_version": "...", "promoted_at": "2026-11-25T10:00:00Z", "reason": "..."}
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PointerError(ValueError):
    pass


@dataclass(frozen=True)
class ModelPointer:
    model_uri: str
    sha256: str
    model_version: str
    promoted_at: str
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelPointer:
        try:
            doc: Any = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise PointerError(f"model pointer is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise PointerError("model pointer must be a JSON object")
        missing = [k for k in ("model_uri", "sha256", "model_version", "promoted_at") if not doc.get(k)]
        if missing:
            raise PointerError(f"model pointer lacks {', '.join(missing)}")
        if not str(doc["model_uri"]).startswith(("s3://", "/", "file://")):
            raise PointerError(f"model pointer uri {doc['model_uri']!r} is not an s3:// URI or a path")
        if not _SHA256.match(str(doc["sha256"])):
            raise PointerError("model pointer sha256 is not a hex SHA-256 digest")
        return cls(**{k: str(doc[k]) for k in ("model_uri", "sha256", "model_version", "promoted_at")},
                   reason=str(doc.get("reason", "")))
