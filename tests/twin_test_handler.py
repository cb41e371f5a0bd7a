"""A stand-in function for the twin's execution environments (``_HANDLER=twin_test_handler.handler``).

``GET /health`` answers 200 with the environment's process id; ``POST /predict`` with the body
``crash`` ends the process while it handles the event, as an out-of-memory kill would.
"""

from __future__ import annotations

import json
import os


def handler(event, context=None):
    if event.get("path") == "/predict" and event.get("body") == "crash":
        os._exit(137)
    return {"statusCode": 200, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"status": "ok", "pid": os.getpid()})}
