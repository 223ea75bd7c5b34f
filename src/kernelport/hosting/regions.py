"""The node's client shared-memory regions, kept by the ``--frontends N`` supervisor, so a
region registered through any front end is known to all of them.

The supervisor keeps only each register call's arguments (it opens nothing) and serialises
the changes. Every front end keeps one connection to ``regions.sock`` in the supervisor's
private directory (next to the workers' broker socket it is given). Messages are JSON, each
preceded by its length (4 bytes, big-endian); a CUDA handle travels as base64:

- front end -> supervisor: ``hello {pid}`` once, before it listens; the answer is
  ``table {changes}``, the registered regions, which it applies. ``publish {id, change}``
  after applying a register/unregister locally; the answer is ``done {id, errors}`` once
  every other live front end answered. ``ack {id, error}`` answers an ``apply``.
- supervisor -> front end: ``apply {id, change}``, a change another front end published.

Repository loads and unloads (``core/model_sync.py``) take the same shape on their own
thread (a load may take minutes; region changes never wait behind one): ``publish_model {id,
change}`` after the change was made locally, ``apply_model {id, change}`` to every other live
front end, each answering ``ack``, then ``done {id, errors}`` to the origin (a front end that
does not answer in ``MODEL_ACK_TIMEOUT_S`` counts as failed; nothing is rolled back). The
supervisor keeps each model's last change, in the order made, and sends them to a front end
that says hello (after its ``table``, announced by its ``models`` count, one ``model
{change}`` message each), so a front end started later loads and unloads what the others did.

The same connection carries the node's statistics (:mod:`kernelport.core.stats_merge`): a
front end asked for statistics sends ``gather {id, model, version}``; the supervisor sends
``collect {id, model, version}`` to every other live front end, each answers ``stats {id,
snapshots}``, and the origin gets ``gathered {id, answers, missing}`` once all answered or
``GATHER_TIMEOUT_S`` passed (a front end that did not answer is left out and named in
``missing``). Gathers run beside the region changes, never queued behind one.

A register that any front end fails to apply is unregistered from those that applied it
before the origin gets its ``done`` with the errors (the origin then unregisters it too, so
the node stays consistent and the client gets an error naming who failed). A front end whose
connection ends counts as gone, never as failed; one that does not answer in
``ACK_TIMEOUT_S`` counts as failed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

from kernelport.protocols.region_link import (
    SOCKET_NAME,
    check_change,
    check_model_change,
    frame,
    receive,
)

log = logging.getLogger("kernelport.frontends")

ACK_TIMEOUT_S = 60.0  # a CUDA handle's first open initialises CUDA in that front end
MODEL_ACK_TIMEOUT_S = 600.0  # a load: as long as a front end's start may take, and then some
GATHER_TIMEOUT_S = 1.0  # statistics are read on a client's request path: never wait long


class _Peer:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.pid = 0
        self.gone = False
        self.acks: dict[int, Any] = {}  # apply id -> its error (None: applied)
        self.stats: dict[int, Any] = {}  # gather id -> its snapshots (JSON)
        self.late = False  # it missed a gather: logged once
        self._sending = threading.Lock()  # gathers and changes send from different threads

    def send(self, message: dict[str, Any]) -> None:
        data = frame(message)
        try:
            with self._sending:
                self.conn.sendall(data)
        except OSError:
            self.gone = True

    @property
    def label(self) -> str:
        return f"front end pid {self.pid}"


class RegionHub:
    """The supervisor's side: the table, and one thread that makes each change in turn."""

    def __init__(
        self,
        directory: Path,
        ack_timeout: float = ACK_TIMEOUT_S,
        gather_timeout: float = GATHER_TIMEOUT_S,
        model_ack_timeout: float = MODEL_ACK_TIMEOUT_S,
    ) -> None:
        self.address = directory / SOCKET_NAME
        self.table: dict[str, dict[str, Any]] = {}  # name -> its register change
        self._ack_timeout = ack_timeout
        self._gather_timeout = gather_timeout
        self._gathering: set[int] = set()  # gathers waiting for answers
        self._model_ack_timeout = model_ack_timeout
        #: name -> its last load/unload change, least recent first (replayed in this order)
        self.models: dict[str, dict[str, Any]] = {}
        self._model_jobs: queue.SimpleQueue[tuple[_Peer, dict[str, Any]] | None] = (
            queue.SimpleQueue()
        )
        self._cond = threading.Condition()
        self._peers: list[_Peer] = []  # those that said hello, in order
        self._all: list[_Peer] = []
        self._jobs: queue.SimpleQueue[tuple[_Peer, dict[str, Any]] | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.address))
        self._listener.listen(64)
        self._threads = [
            threading.Thread(target=self._accept, name="regions-accept", daemon=True),
            threading.Thread(target=self._work, name="regions", daemon=True),
            threading.Thread(target=self._work_models, name="regions-models", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: stopping
                return
            peer = _Peer(conn)
            with self._cond:
                self._all.append(peer)
            threading.Thread(target=self._read, args=(peer,), name="regions-peer",
                             daemon=True).start()  # fmt: skip

    def _read(self, peer: _Peer) -> None:
        """Route one front end's messages; it never waits, so acks always get through."""
        try:
            while (message := receive(peer.conn)) is not None:
                op = message.get("op")
                if op == "ack":
                    with self._cond:
                        peer.acks[int(message["id"])] = message.get("error")
                        self._cond.notify_all()
                elif op == "stats":
                    with self._cond:
                        if int(message["id"]) in self._gathering:  # else: too late, dropped
                            peer.stats[int(message["id"])] = message["snapshots"]
                            self._cond.notify_all()
                elif op == "publish_model":
                    self._model_jobs.put((peer, message))
                elif op == "gather":
                    threading.Thread(target=self._gather, args=(peer, message),
                                     name="regions-gather", daemon=True).start()  # fmt: skip
                else:
                    self._jobs.put((peer, message))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("shared-memory regions: %s: %s", peer.label, exc)
        with self._cond:
            peer.gone = True
            self._cond.notify_all()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            peer, message = job
            with self._cond:
                self._peers = [p for p in self._peers if not p.gone]
            if peer.gone:  # it died: no client is waiting for its answer
                continue
            try:
                if message.get("op") == "hello":
                    peer.pid = int(message.get("pid", 0))
                    with self._cond:  # no model change between its table and its joining
                        models = list(self.models.values())
                        table = {"op": "table", "changes": list(self.table.values())}
                        peer.send({**table, "models": len(models)} if models else table)
                        for change in models:
                            peer.send({"op": "model", "change": change})
                        self._peers.append(peer)
                elif message.get("op") == "publish":
                    errors = self._publish(peer, message["change"])
                    # sent before the next change goes out: the origin undoes a failed
                    # register before it sees anything else
                    peer.send({"op": "done", "id": message["id"], "errors": errors})
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("shared-memory regions: %s sent %r: %s", peer.label, message, exc)
                peer.send({"op": "done", "id": message.get("id"),
                           "errors": [_error(peer, "INVALID_ARGUMENT", str(exc))]})  # fmt: skip

    def _work_models(self) -> None:
        while (job := self._model_jobs.get()) is not None:
            peer, message = job
            try:
                errors = self._publish_model(peer, message["change"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("models: %s sent %r: %s", peer.label, message, exc)
                errors = [_error(peer, "INVALID_ARGUMENT", str(exc))]
            peer.send({"op": "done", "id": message.get("id"), "errors": errors})

    def _publish_model(self, origin: _Peer, change: dict[str, Any]) -> list[dict[str, str]]:
        check_model_change(change)
        with self._cond:  # recorded first: a front end saying hello now gets it either way
            others = [p for p in self._peers if p is not origin and not p.gone]
            for name in (change["name"], *change.get("also", ())):
                self.models.pop(name, None)
                self.models[name] = change if name == change["name"] else {
                    "op": "unload", "name": name}  # fmt: skip
        failed = self._broadcast(others, change, "apply_model", self._model_ack_timeout)
        if failed:
            log.warning("model '%s': %s failed on other front ends: %s", change["name"],
                        change["op"], _why(failed))  # fmt: skip
        return _errors(failed)

    def _publish(self, origin: _Peer, change: dict[str, Any]) -> list[dict[str, str]]:
        check_change(change)
        op, kind, name = change["op"], change["kind"], change["name"]
        if op == "register" and name in self.table:
            message = f"shared memory region '{name}' already in manager"
            return [_error(None, "ALREADY_EXISTS", message)]
        with self._cond:
            others = [p for p in self._peers if p is not origin]
        failed = self._broadcast(others, change)
        if op == "unregister":
            for key in [k for k, c in self.table.items() if c["kind"] == kind]:
                if not name or key == name:
                    del self.table[key]
        elif failed:
            applied = [p for p in others if p not in failed and not p.gone]
            undo = {"op": "unregister", "kind": kind, "name": name}
            self._broadcast(applied, undo)
            log.warning("shared-memory region '%s' not registered: %s", name, _why(failed))
        else:
            self.table[name] = change
        return _errors(failed)

    def _gather(self, origin: _Peer, message: dict[str, Any]) -> None:
        """Collect the other live front ends' snapshots for ``origin``'s selection."""
        ident = next(self._ids)
        ask = {"op": "collect", "id": ident, "model": str(message.get("model", "")),
               "version": str(message.get("version", ""))}  # fmt: skip
        with self._cond:
            others = [p for p in self._peers if p is not origin and not p.gone]
            self._gathering.add(ident)
        for peer in others:
            peer.send(ask)
        deadline = time.monotonic() + self._gather_timeout
        answers, missing = [], []
        with self._cond:
            for peer in others:
                if self._answered(peer, peer.stats, ident, deadline):
                    answers.append(peer.stats.pop(ident))
                elif not peer.gone:
                    missing.append(peer.label)
                    if not peer.late:
                        peer.late = True
                        log.warning("statistics: %s did not answer in %g s; left out (logged "
                                    "once)", peer.label, self._gather_timeout)  # fmt: skip
            self._gathering.discard(ident)
            for peer in others:  # one that answered after its turn was counted missing
                peer.stats.pop(ident, None)
        origin.send({"op": "gathered", "id": message.get("id"), "answers": answers,
                     "missing": missing})  # fmt: skip

    def _broadcast(
        self, peers: list[_Peer], change: dict[str, Any], op: str = "apply",
        timeout: float | None = None,
    ) -> dict[_Peer, Any]:  # fmt: skip
        """Send ``change`` to ``peers``; their errors, once each answered or is gone."""
        ident = next(self._ids)
        for peer in peers:
            peer.send({"op": op, "id": ident, "change": change})
        timeout = self._ack_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        failed: dict[_Peer, Any] = {}
        with self._cond:
            for peer in peers:
                if self._answered(peer, peer.acks, ident, deadline):
                    error = peer.acks.pop(ident)
                    if error:
                        failed[peer] = error
                elif not peer.gone:
                    failed[peer] = {"code": "UNAVAILABLE",
                                    "message": f"no answer in {timeout:g} s"}  # fmt: skip
        return failed

    def _answered(self, peer: _Peer, box: dict[int, Any], ident: int, deadline: float) -> bool:
        """Under ``self._cond``: wait until ``peer``'s answer ``ident`` is in ``box`` (its
        acks or its statistics), the peer is gone, or ``deadline`` passes; whether it is."""
        while ident not in box and not peer.gone:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return ident in box

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        self._jobs.put(None)
        self._model_jobs.put(None)
        self._threads[1].join(5.0)
        with self._cond:
            peers = list(self._all)
        for peer in peers:
            with contextlib.suppress(OSError):
                peer.conn.shutdown(socket.SHUT_RDWR)
            peer.conn.close()


def _error(peer: _Peer | None, code: str, message: str) -> dict[str, str]:
    return {"where": peer.label if peer is not None else "supervisor", "code": code,
            "message": message}  # fmt: skip


def _why(failed: dict[_Peer, Any]) -> str:
    return "; ".join(f"{p.label}: {e['message']}" for p, e in failed.items())


def _errors(failed: dict[_Peer, Any]) -> list[dict[str, str]]:
    """The failed front ends' errors, as the origin's ``done`` carries them."""
    return [_error(p, e.get("code", "INTERNAL"), e["message"]) for p, e in failed.items()]
