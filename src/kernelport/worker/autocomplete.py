"""``python -m kernelport.worker.autocomplete``: a backend's ``autocomplete`` in a process of
its own, for backends whose runtime must not run in the server's process (see
``Backend.embeddable``). Reads ``{"backend", "raw", "path"}`` as JSON on stdin, writes
``{"config": ...}`` or ``{"error": {"code", "message"}}`` as JSON on stdout. A runtime that
crashes on a broken file takes only this process with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kernelport.backends.registry import get_backend
from kernelport.errors import ServerError


def main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    try:
        backend = get_backend(request["backend"])
        config = backend.autocomplete(request["raw"], Path(request["path"]))
        reply = {"config": config}
    except ServerError as exc:
        reply = {"error": {"code": exc.code.value, "message": exc.message}}
    except Exception as exc:
        reply = {"error": {"code": "INVALID_ARGUMENT", "message": f"{type(exc).__name__}: {exc}"}}
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
