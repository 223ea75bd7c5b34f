"""Per-connection announcements of ModelInfer calls, for the ASGI gRPC front end.

A gRPC call names its model inside the message, so the model is known only once the body has
been received and parsed, and by then the request is a step from the queue. What is known at
the call's start is the connection: a client sends the same model's requests down one
connection, over and over (perf_analyzer, a tritonclient per model). So a new ModelInfer call
on a connection is announced (``DataPlane.announce``, core/fill.py) to the model the last one
on that connection named, from the call's start until it is parsed. Parsing, decoding and
submitting then run without yielding to the loop, so no batch cut can see the gap between
releasing the guess and queuing the request: a guess for the wrong model is simply released,
and the connection remembers the model the request named instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kernelport.core.fill import Announcement

#: the RPC whose calls are announced
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: connections remembered at most; past it the memory starts afresh (a connection's next call
#: is then not announced, once): no close event reaches the app to forget one by
LIMIT = 4096


class ConnectionModels:
    """The model the last ModelInfer call on each connection named, and announcements to it.

    ``announce`` is ``DataPlane.announce``; a connection is whatever identifies it in the
    ASGI scope (the client's address and port, from ``scope["client"]``).
    """

    __slots__ = ("_announce", "_last", "limit")

    def __init__(
        self, announce: Callable[[str, str], Announcement | None], limit: int = LIMIT
    ) -> None:
        self._announce = announce
        self._last: dict[Any, tuple[str, str]] = {}
        self.limit = limit

    def begin(self, connection: Any) -> Announcement | None:
        """A ModelInfer call started on ``connection``: announced to its last model, if any."""
        last = self._last.get(connection)
        return None if last is None else self._announce(last[0], last[1])

    def parsed(self, connection: Any, request: Any) -> None:
        """The call's request (a ModelInferRequest) is parsed: remember the model it names."""
        name, version = request.model_name, request.model_version
        last = self._last.get(connection)
        if last is None or last[0] != name or last[1] != version:
            if last is None and len(self._last) >= self.limit:
                self._last.clear()
            self._last[connection] = (name, version)
