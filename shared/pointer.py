"""The promoted-model pointer: the one value promotion changes and serving reads.

In the cloud it is an SSM parameter; in the local twin the same JSON lives in the same place
(moto's SSM on loopback). Its value::

    {"model_uri": "s3://bucket/models/.../model.tar.gz", "sha256": "<of model.tar.gz>",
     "model_version": "...", "promoted_at": "2026-11-25T10:00:00Z", "reason": "...",
     "previous": {<the same fields: the approved model that served before this one>} or absent}

``previous`` is what serving falls back to when the promoted archive cannot be loaded, and what a
rollback goes back to. It holds one level only (a previous pointer has no ``previous`` of its own).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
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
    previous: ModelPointer | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k != "previous"}
        if self.previous is not None:
            doc["previous"] = self.previous.to_dict()
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def succeeded_by(self, newer: ModelPointer) -> ModelPointer:
        """``newer`` with this pointer (without its own ``previous``) as its fallback."""
        return replace(newer, previous=replace(self, previous=None))

    @classmethod
    def from_json(cls, text: str) -> ModelPointer:
        try:
            doc: Any = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise PointerError(f"model pointer is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any, nested: bool = False) -> ModelPointer:
        """Raises :class:`PointerError` naming the first field that is missing or malformed."""
        if not isinstance(doc, dict):
            raise PointerError("model pointer must be a JSON object")
        missing = [k for k in ("model_uri", "sha256", "model_version", "promoted_at") if not doc.get(k)]
        if missing:
            raise PointerError(f"model pointer lacks {', '.join(missing)}")
        if not str(doc["model_uri"]).startswith(("s3://", "/", "file://")):
            raise PointerError(f"model pointer uri {doc['model_uri']!r} is not an s3:// URI or a path")
        if not _SHA256.match(str(doc["sha256"])):
            raise PointerError("model pointer sha256 is not a hex SHA-256 digest")
        previous = None
        if doc.get("previous") is not None:
            if nested:
                raise PointerError("a previous model pointer cannot name a previous of its own")
            previous = cls.from_dict(doc["previous"], nested=True)
        return cls(**{k: str(doc[k]) for k in ("model_uri", "sha256", "model_version", "promoted_at")},
                   reason=str(doc.get("reason", "")), previous=previous)
