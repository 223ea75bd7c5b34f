"""A node that dies behind the gateway: requests never sent to it are served by the other
node; those it had taken get 503 / UNAVAILABLE naming it; none hangs; it comes back."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server, start_server
from gateway_nodes import (
    count,
    infer_json,
    node_repository,
    node_up,
    running_gateway,
    status,
)
from gateway_nodes import wait_until as until
from tritonclient.utils import InferenceServerException


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[dict[str, RunningServer]]:
    repo = node_repository(tmp_path)
    with (
        running_server(tmp_path, repo, "--readiness", "any", wait_for="ready") as a,
        running_server(tmp_path, repo, "--readiness", "any", wait_for="ready") as b,
    ):
        yield {"a": a, "b": b}


def _refuses(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _grpc_infer(client: grpcclient.InferenceServerClient, model: str) -> None:
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.ones(4, dtype=np.float32))
    client.infer(model, [tensor], client_timeout=15)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_requests_for_a_dead_node_go_to_the_other_before_they_are_sent(
    protocol: str, two_nodes: dict[str, RunningServer], tmp_path: Path
) -> None:
    # Health checks far apart: only the forwarding path can notice the dead node.
    with running_gateway(tmp_path, two_nodes, "--health-interval", "600") as gw:
        two_nodes["b"].stop(signal.SIGKILL)
        # Under Envoy the launcher's death kills Envoy a moment later (PDEATHSIG): b is dead
        # once its port refuses connections, not when the launcher is reaped.
        until(lambda: _refuses(two_nodes["b"].http_url), 30, "b's port closed")
        # One request the gateway answers itself: its loop then has handled the close of its
        # idle keep-alive connections to b, so no request is written to one of them (such a
        # request counts as sent, and would get 503: see docs/gateway.md).
        status(gw)
        before = count(two_nodes["a"], "ident")
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        for _ in range(6):  # round robin would send half of these to b
            if protocol == "http":
                assert infer_json(gw.http_url, "ident", [1.0] * 4)[0] == 200
            else:
                _grpc_infer(client, "ident")
        assert count(two_nodes["a"], "ident") == before + 6
        assert not node_up(gw, "b")
        assert "node b removed from routing: node 'b' is unreachable" in gw.log()


@dataclass
class Outcomes:
    """Each request's start time and result: "ok", "unavailable" or the unexpected error."""

    results: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, started: float, result: str) -> None:
        with self.lock:
            self.results.append((started, result))

    def since(self, moment: float) -> list[str]:
        with self.lock:
            return [r for t, r in self.results if t >= moment]


# What b says, or the gateway says for it: its own refusal while it shuts down (its launcher's
# death closes its control socket to Envoy a moment before the kernel delivers Envoy's
# PDEATHSIG, and the server inside Envoy starts draining in that moment), or the gateway's
# UNAVAILABLE naming it. Node a never shuts down here, so the refusal can only be b's.
_B_GONE = ("node 'b'", "server is shutting down: request refused")


def _load(gateway: RunningServer, protocol: str, stop: threading.Event, out: Outcomes) -> None:
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    while not stop.is_set():
        started = time.monotonic()
        if protocol == "http":
            try:
                code, body = infer_json(gateway.http_url, "work", [1.0] * 4, timeout=15)
            except OSError as exc:  # a timeout would be a hang
                out.add(started, f"http: {exc}")
                continue
            ok = code == 200
            named = code == 503 and any(text in body.get("error", "") for text in _B_GONE)
            out.add(started, "ok" if ok else "unavailable" if named else f"{code} {body}")
            continue
        try:
            _grpc_infer(client, "work")
            out.add(started, "ok")
        except InferenceServerException as exc:
            named = exc.status() == "StatusCode.UNAVAILABLE" and any(
                text in exc.message() for text in _B_GONE
            )
            out.add(started, "unavailable" if named else f"{exc.status()} {exc.message()}")


def test_a_node_killed_under_load_loses_nothing_retryable_and_comes_back(
    two_nodes: dict[str, RunningServer], tmp_path: Path
) -> None:
    a, b = two_nodes["a"], two_nodes["b"]
    args = ("--health-interval", "0.2", "--health-failures", "2")
    with running_gateway(tmp_path, two_nodes, *args) as gw:
        stop, out = threading.Event(), Outcomes()
        threads = [
            threading.Thread(target=_load, args=(gw, protocol, stop, out))
            for protocol in ("http", "grpc") * 4
        ]
        for thread in threads:
            thread.start()
        try:
            until(lambda: count(a, "work") > 20 and count(b, "work") > 20, what="load on both")
            b.stop(signal.SIGKILL)
            until(lambda: not node_up(gw, "b"), what="b out of routing")
            gone = time.monotonic()
            until(lambda: len(out.since(gone)) >= 80, what="requests after b left")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not any(t.is_alive() for t in threads), "a request hung"
        results = [r for _, r in out.results]
        assert set(results) <= {"ok", "unavailable"}, [r for r in results if r not in
                                                         ("ok", "unavailable")][:5]  # fmt: skip
        assert set(out.since(gone)) == {"ok"}
        # at most the requests b had taken when it died (one per load thread) failed
        assert results.count("unavailable") <= len(threads)

        # the node comes back on its ports and is routed to again
        back = start_server(tmp_path, node_repository(tmp_path / "again"), "--readiness", "any",
                            "--http-port", str(b.http_port), "--grpc-port", str(b.grpc_port),
                            wait_for="ready")  # fmt: skip
        try:
            until(lambda: node_up(gw, "b"), what="b back in routing")
            for _ in range(4):
                assert infer_json(gw.http_url, "ident", [2.0] * 4)[0] == 200
            assert count(back, "ident") == 2
            assert "node b in routing" in gw.log().split("removed from routing")[-1]
            assert all(n["outstanding"] == 0 for n in status(gw)["nodes"])
        finally:
            back.stop()
