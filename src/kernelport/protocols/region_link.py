"""A front end's side of the node's shared-memory regions, repository loads/unloads and
statistics (:mod:`kernelport.hosting.regions`, where the protocol is described): one
connection to the supervisor, on this front end's event loop, and the messages' framing
both sides use."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kernelport.core.model_sync import ModelChange
from kernelport.core.shm import SharedMemoryRegistry
from kernelport.core.shm_sync import RegionChange, apply, undo
from kernelport.core.stats import ModelStatsSnapshot
from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.stats_wire import decode_snapshot, encode_snapshot

log = logging.getLogger("kernelport.server")


SOCKET_NAME = "regions.sock"
MAX_MESSAGE = 1 << 24
#: how long a statistics request waits for the supervisor's ``gathered`` (which itself
#: gives up on a silent front end after ``hosting.regions.GATHER_TIMEOUT_S``)
GATHER_WAIT_S = 2.0

Statistics = Callable[[str, str], list[ModelStatsSnapshot]]
Models = Callable[[ModelChange], Awaitable[None]]
_GONE = "the front ends' supervisor is gone"
_OVERHEAD = 1024  # a model change message's JSON around its name, config and files
_LENGTH = struct.Struct(">I")


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return _LENGTH.pack(len(body)) + body


def unframe(body: bytes) -> dict[str, Any]:
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def receive(conn: socket.socket) -> dict[str, Any] | None:
    """The next message on a blocking socket, or None at EOF."""
    head = _exactly(conn, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    body = _exactly(conn, size)
    return None if body is None else unframe(body)


def _exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode(change: RegionChange) -> dict[str, Any]:
    return {
        "op": change.op, "kind": change.kind, "name": change.name, "key": change.key,
        "offset": change.offset, "byte_size": change.byte_size,
        "raw_handle": base64.b64encode(change.raw_handle).decode(),
        "device_id": change.device_id,
    }  # fmt: skip


def check_change(obj: dict[str, Any]) -> None:
    """Raise ValueError unless ``obj`` names a change: op, kind and a string name."""
    if obj.get("op") not in ("register", "unregister") or obj.get("kind") not in (
        "system", "cuda"
    ) or not isinstance(obj.get("name"), str):  # fmt: skip
        raise ValueError(f"not a region change: {obj!r}")


def decode(obj: dict[str, Any]) -> RegionChange:
    check_change(obj)
    return RegionChange(
        obj["op"], obj["kind"], obj["name"], str(obj.get("key", "")), int(obj.get("offset", 0)),
        int(obj.get("byte_size", 0)), base64.b64decode(obj.get("raw_handle", "")),
        int(obj.get("device_id", 0)),
    )  # fmt: skip


def encode_model(change: ModelChange) -> dict[str, Any]:
    return {
        "op": change.op, "name": change.name, "config": change.config,
        "files": {k: base64.b64encode(v).decode() for k, v in change.files.items()},
        "unload_dependents": change.unload_dependents, "also": list(change.also),
    }  # fmt: skip


def check_model_change(obj: dict[str, Any]) -> None:
    """Raise ValueError unless ``obj`` names a model change: op and a string name."""
    if obj.get("op") not in ("load", "unload") or not isinstance(obj.get("name"), str):
        raise ValueError(f"not a model change: {obj!r}")


def decode_model(obj: dict[str, Any]) -> ModelChange:
    check_model_change(obj)
    config = obj.get("config")
    return ModelChange(
        obj["op"], obj["name"], None if config is None else str(config),
        {str(k): base64.b64decode(v) for k, v in (obj.get("files") or {}).items()},
        bool(obj.get("unload_dependents", False)), tuple(map(str, obj.get("also", ()))),
    )  # fmt: skip


def address_next_to(workers: Path) -> Path:
    """The supervisor's regions socket: in the private directory of its workers' socket."""
    return workers.parent / SOCKET_NAME


class RegionLink:
    """``RegionPeers`` and ``StatisticsPeers`` over the supervisor: ``connect()`` before
    listening, ``close()``. ``statistics`` answers the other front ends' gathers (this front
    end's own snapshots of a selection; none when unset)."""

    def __init__(
        self,
        registry: SharedMemoryRegistry,
        address: Path,
        statistics: Statistics | None = None,
        gather_wait: float = GATHER_WAIT_S,
        models: Models | None = None,
    ) -> None:
        self._registry = registry
        self._address = address
        self.statistics = statistics
        self.models = models  # makes another front end's load/unload here
        self._model_pending: dict[int, asyncio.Future[None]] = {}
        self._applying: set[asyncio.Task[None]] = set()
        self._gather_wait = gather_wait
        self._gather_late = False  # the supervisor missed a gather: logged once
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[RegionChange, asyncio.Future[None]]] = {}
        self._gathers: dict[int, asyncio.Future[list[list[ModelStatsSnapshot]]]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Join the node: apply the regions registered before this front end started."""
        self._reader, self._writer = await asyncio.open_unix_connection(str(self._address))
        self._writer.write(frame({"op": "hello", "pid": os.getpid()}))
        table = await self._receive()
        if table is None or table.get("op") != "table":
            raise RuntimeError(f"shared-memory regions: no table from {self._address}")
        failed = []
        for obj in table["changes"]:
            change = decode(obj)
            try:
                apply(self._registry, change)
            except ServerError as exc:
                log.warning("shared memory region '%s' registered on the other front ends "
                            "cannot be opened here: %s", change.name, exc)  # fmt: skip
                failed.append(change)
        for _ in range(int(table.get("models", 0))):  # what the node loaded and unloaded
            message = await self._receive()
            if message is None or message.get("op") != "model":
                raise RuntimeError(f"models: no model change from {self._address}")
            model = decode_model(message["change"])
            if await self._apply_model(model) is not None:
                log.warning("model '%s' is not as on the other front ends (%s failed here)",
                            model.name, model.op)  # fmt: skip
        self._task = asyncio.create_task(self._listen())
        for change in failed:  # nowhere rather than only on some front ends
            with contextlib.suppress(ServerError):
                await self.publish(RegionChange("unregister", change.kind, change.name))

    def _link(self) -> asyncio.StreamWriter | None:
        """The connection to the supervisor; None before ``connect()`` or once it is gone."""
        return None if self._task is None or self._task.done() else self._writer

    async def publish(self, change: RegionChange) -> None:
        if (writer := self._link()) is None:
            undo(self._registry, change)
            raise ServerError(ErrorCode.UNAVAILABLE, _GONE)
        ident = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._pending[ident] = (change, done)
        writer.write(frame({"op": "publish", "id": ident, "change": encode(change)}))
        await done

    def check_model(self, change: ModelChange) -> None:
        # base64's length, without encoding what may be hundreds of MiB only to refuse it
        files = sum(4 * ((len(data) + 2) // 3) + len(key) + 8 for key, data in change.files.items())
        size = files + len(json.dumps([change.config, change.name])) + _OVERHEAD
        if size > MAX_MESSAGE:
            raise ServerError(
                ErrorCode.INVALID_ARGUMENT,
                f"model '{change.name}': the load request's files are too large to share with "
                f"the other front ends of --frontends ({size} bytes encoded, at most "
                f"{MAX_MESSAGE}); put the model in the repository instead",
            )

    async def publish_model(self, change: ModelChange) -> None:
        what = f"model '{change.name}' was {change.op}ed here but"
        if (writer := self._link()) is None:
            raise ServerError(ErrorCode.UNAVAILABLE, f"{what} not on the other front ends: {_GONE}")
        ident = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._model_pending[ident] = done
        writer.write(frame({"op": "publish_model", "id": ident, "change": encode_model(change)}))
        try:
            await done
        except ServerError as exc:
            raise ServerError(exc.code, f"{what} {exc}") from None

    async def _apply_model(self, change: ModelChange) -> dict[str, str] | None:
        if self.models is None:
            return {"code": "UNAVAILABLE", "message": "models are not shared here"}
        try:
            await self.models(change)
        except ServerError as exc:
            log.warning("model '%s' (%s on another front end) failed here: %s",
                        change.name, change.op, exc)  # fmt: skip
            return {"code": exc.code.value, "message": str(exc)}
        return None

    async def _apply_and_ack(self, message: dict[str, Any]) -> None:
        error = await self._apply_model(decode_model(message["change"]))
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame({"op": "ack", "id": message["id"], "error": error}))

    async def gather(self, name: str, version: str) -> list[list[ModelStatsSnapshot]]:
        """The other live front ends' snapshots of the selection, one list each; those that
        do not answer in time (or all of them, if the supervisor is gone) are left out."""
        if (writer := self._link()) is None:
            return []
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._gathers[ident] = future
        writer.write(frame({"op": "gather", "id": ident, "model": name, "version": version}))
        try:
            return await asyncio.wait_for(future, self._gather_wait)
        except TimeoutError:
            if not self._gather_late:
                self._gather_late = True
                log.warning("statistics: the supervisor did not answer in %g s; this front "
                            "end's alone (logged once)", self._gather_wait)  # fmt: skip
            return []
        finally:
            self._gathers.pop(ident, None)

    def _collect(self, message: dict[str, Any]) -> dict[str, Any]:
        """This front end's answer to another's gather."""
        snapshots: list[ModelStatsSnapshot] = []
        if self.statistics is not None:
            with contextlib.suppress(ServerError):  # not loaded here (any more): nothing
                snapshots = self.statistics(str(message["model"]), str(message["version"]))
        return {"op": "stats", "id": message["id"],
                "snapshots": [encode_snapshot(s) for s in snapshots]}  # fmt: skip

    def _gathered(self, message: dict[str, Any]) -> None:
        future = self._gathers.get(int(message["id"]))
        if future is None or future.done():  # the request gave up waiting
            return
        answers = []
        for snapshots in message["answers"]:
            try:
                answers.append([decode_snapshot(s) for s in snapshots])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("statistics: a front end's answer is malformed: %s", exc)
        future.set_result(answers)

    async def _receive(self) -> dict[str, Any] | None:
        assert self._reader is not None
        try:
            (size,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            if size > MAX_MESSAGE:
                raise ValueError(f"a message of {size} bytes")
            return unframe(await self._reader.readexactly(size))
        except asyncio.IncompleteReadError:
            return None

    async def _listen(self) -> None:
        assert self._writer is not None
        try:
            while (message := await self._receive()) is not None:
                if message["op"] == "apply":
                    error = self._apply(decode(message["change"]))
                    self._writer.write(frame({"op": "ack", "id": message["id"], "error": error}))
                elif message["op"] == "apply_model":
                    decode_model(message["change"])  # a malformed one ends the link here
                    task = asyncio.create_task(self._apply_and_ack(message))
                    self._applying.add(task)
                    task.add_done_callback(self._applying.discard)
                elif message["op"] == "done" and message["id"] in self._model_pending:
                    self._model_done(message["id"], message["errors"])
                elif message["op"] == "done":
                    self._done(message["id"], message["errors"])
                elif message["op"] == "collect":
                    self._writer.write(frame(self._collect(message)))
                elif message["op"] == "gathered":
                    self._gathered(message)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("shared-memory regions: the link to the supervisor failed: %s", exc)
        finally:
            for change, future in self._pending.values():
                undo(self._registry, change)
                if not future.done():
                    future.set_exception(ServerError(ErrorCode.UNAVAILABLE, _GONE))
            self._pending.clear()
            for pending in self._model_pending.values():
                if not pending.done():
                    pending.set_exception(ServerError(ErrorCode.UNAVAILABLE, f"not on the "
                                                      f"other front ends: {_GONE}"))  # fmt: skip
            self._model_pending.clear()
            for gathered in self._gathers.values():
                if not gathered.done():
                    gathered.set_result([])  # this front end's statistics alone

    def _apply(self, change: RegionChange) -> dict[str, str] | None:
        try:
            apply(self._registry, change)
        except ServerError as exc:
            if change.op == "unregister" and exc.code is ErrorCode.NOT_FOUND:
                return None  # unregistered here as well, meanwhile: the same end state
            log.warning("shared memory region '%s' (%s on another front end) failed here: %s",
                        change.name, change.op, exc)  # fmt: skip
            return {"code": exc.code.value, "message": str(exc)}
        return None

    def _model_done(self, ident: int, errors: list[dict[str, str]]) -> None:
        future = self._model_pending.pop(ident)
        if future.done():  # the caller went away
            return
        if not errors:
            future.set_result(None)
            return
        code, detail = _failure(errors)
        future.set_exception(ServerError(code, f"failed on other front ends ({detail})"))

    def _done(self, ident: int, errors: list[dict[str, str]]) -> None:
        change, future = self._pending.pop(ident)
        if errors:
            undo(self._registry, change)  # now, before any later change is read
            code, detail = _failure(errors)
            what = "registered" if change.op == "register" else "unregistered"
            if future.done():  # the caller went away; the undo above still holds
                return
            future.set_exception(ServerError(
                code, f"shared memory region '{change.name}' could not be {what} on every "
                f"front end ({detail})",
            ))  # fmt: skip
        elif not future.done():
            future.set_result(None)

    async def close(self) -> None:
        for applying in list(self._applying):
            applying.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def _failure(errors: list[dict[str, str]]) -> tuple[ErrorCode, str]:
    """The code (the first failed front end's) and the details of a ``done`` with errors."""
    detail = "; ".join(f"{e['where']}: {e['message']}" for e in errors)
    try:
        return ErrorCode(errors[0]["code"]), detail
    except ValueError:
        return ErrorCode.INTERNAL, detail
