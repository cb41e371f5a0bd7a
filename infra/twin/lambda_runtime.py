"""One Lambda execution environment of the inference function, as a child process of the twin.

Like Lambda, it imports the handler once (the init phase, which loads the model), then handles one
event at a time for as long as it lives. The twin talks to it over a pipe, one JSON document per
line each way: the API Gateway proxy event in on stdin; out on the original stdout first
``{"taken": true}`` as soon as the event is read (as Lambda's runtime API hands an event over on
``/next``: the twin knows from it that the event reached a function), then the handler's response
(or, if the handler raised, Lambda's ``{"errorType", "errorMessage"}``). Whatever the
function itself prints (Powertools' JSON logs, EMF metrics) goes to stderr, the twin's stand-in for
CloudWatch Logs. When the twin goes away, stdin closes and the environment exits.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

# Lambda names the handler in _HANDLER (module.function); the inference function's by default.
DEFAULT_HANDLER = "inference_lambda.app.handler"


def main() -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # the function's own output (logs, metrics) must never mix with the protocol
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", closefd=False)

    t0 = time.perf_counter()
    try:
        module, _, name = (os.environ.get("_HANDLER") or DEFAULT_HANDLER).rpartition(".")
        handler = getattr(importlib.import_module(module), name)
        from inference_lambda.app import LocalContext
    except Exception as exc:  # noqa: BLE001 - an init error is reported, as Lambda reports Runtime.ImportModuleError
        traceback.print_exc()
        channel.write(json.dumps({"ready": False, "errorType": type(exc).__name__, "errorMessage": str(exc)}) + "\n")
        return 1
    channel.write(json.dumps({"ready": True, "init_seconds": round(time.perf_counter() - t0, 3),
                              "pid": os.getpid()}) + "\n")

    for line in sys.stdin:
        channel.write('{"taken": true}\n')
        try:
            event = json.loads(line)
            response = handler(event, LocalContext())
        except Exception as exc:  # noqa: BLE001 - an unhandled error is what Lambda reports to API Gateway
            traceback.print_exc()
            response = {"errorType": type(exc).__name__, "errorMessage": str(exc)}
        try:
            channel.write(json.dumps(response) + "\n")
        except (TypeError, ValueError) as exc:
            channel.write(json.dumps({"errorType": "Runtime.MarshalError", "errorMessage": str(exc)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
