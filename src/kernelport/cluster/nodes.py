"""The nodes behind the gateway: what each serves, whether it answers, and which one to use.

Every ``health_interval`` each node is asked for its readiness (``GET /v2/health/ready``),
its models (``POST /v2/repository/index``) and, once, its metadata. A node that stops
answering for ``health_failures`` checks in a row, says it is not ready, or refuses a
forwarded connection leaves routing at once (logged) and comes back with its next good check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

from kernelport.cluster.placement import Chooser, replace_placement
from kernelport.cluster.settings import GatewayConfig, NodeSpec
from kernelport.errors import ErrorCode, ServerError, not_found, unavailable

log = logging.getLogger("kernelport.gateway")
T = TypeVar("T")


class NotSent(Exception):
    """The request never reached the node (no connection): safe to send elsewhere."""


@dataclass(slots=True)
class Node:
    """One node's state as the gateway knows it (mutated on the event loop only)."""

    spec: NodeSpec
    up: bool = False
    failures: int = 0
    ready_models: frozenset[str] = frozenset()
    known_models: frozenset[str] = frozenset()
    extensions: tuple[str, ...] | None = None
    outstanding: int = 0
    forwarded: int = 0  # requests sent to it
    removals: int = 0  # times taken out of routing
    infer_ns: dict[str, int] = field(default_factory=dict)  # last compute_infer sample

    @property
    def name(self) -> str:
        return self.spec.name


class NodeTable:
    """The nodes, their health, and the choice of a node for each model's request."""

    def __init__(self, config: GatewayConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.nodes = {spec.name: Node(spec) for spec in config.node}
        self._order = [spec.name for spec in config.node]
        self._session = session
        self.chooser = Chooser(config.policy)
        self._costs_at = time.monotonic()
        self.measured: dict[str, float] = {}
        self.checked = asyncio.Event()  # set after the first round of checks
        self.retried = 0  # requests sent again to another node (the first was unreachable)

    # ---- routing -------------------------------------------------------------------------

    def pick(self, model: str, exclude: frozenset[str] = frozenset()) -> Node:
        """The node to send ``model``'s request to (UNAVAILABLE / NOT_FOUND if none)."""
        candidates = [
            n
            for n in self._order
            if n not in exclude and self.nodes[n].up and model in self.nodes[n].ready_models
        ]
        if not candidates:
            if not model or not any(model in n.known_models for n in self.nodes.values()):
                raise not_found(f"model '{model}' is not served by any node behind the gateway")
            raise unavailable(f"model '{model}' is not ready on any reachable node")
        outstanding = {n: self.nodes[n].outstanding for n in candidates}
        return self.nodes[self.chooser.choose(model, candidates, outstanding)]

    async def attempt(self, model: str, send: Callable[[Node], Awaitable[T]]) -> T:
        """``send`` to the node chosen for ``model``; if it raises ``NotSent``, once more to
        another node with the model ready. Nothing that may have reached a node is resent."""
        node = self.pick(model)
        try:
            return await send(node)
        except NotSent as exc:
            self.unreachable(node, str(exc))
            first = str(exc)
        self.retried += 1
        try:
            retry = self.pick(model, exclude=frozenset({node.name}))
        except ServerError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                raise
            raise unavailable(f"{first}; no other node has model '{model}' ready") from None
        try:
            return await send(retry)
        except NotSent as exc:
            self.unreachable(retry, str(exc))
            raise unavailable(f"{first}; {exc}") from None

    def add_node(self, spec: NodeSpec) -> Node:
        """A node that joined (cluster mode): routed to after its first good check."""
        node = self.nodes[spec.name] = Node(spec)
        self._order.append(spec.name)
        return node

    def remove_node(self, name: str) -> None:
        """A node that is gone for good (cluster mode): out of routing and placement now;
        requests already sent to it end with its connection."""
        if self.nodes.pop(name, None) is not None:
            self._order.remove(name)
            self._replace_placement()

    def up_nodes(self) -> list[Node]:
        return [self.nodes[n] for n in self._order if self.nodes[n].up]

    def ready(self) -> bool:
        return any(n.up for n in self.nodes.values())

    def extensions(self) -> list[str]:
        """The extensions every reachable node declares."""
        sets = [set(n.extensions) for n in self.up_nodes() if n.extensions is not None]
        common = set.intersection(*sets) if sets else set()
        return sorted(common)

    @contextmanager
    def in_flight(self, node: Node) -> Iterator[None]:
        node.forwarded += 1
        node.outstanding += 1
        try:
            yield
        finally:
            node.outstanding -= 1

    def unreachable(self, node: Node, reason: str) -> None:
        """A forwarded request could not connect: out of routing until it answers a check."""
        if node.up:
            node.up = False
            node.removals += 1
            log.warning("node %s removed from routing: %s", node.name, reason)
            self._replace_placement()

    def status(self) -> dict[str, Any]:
        """What ``GET /v2/gateway`` shows."""
        return {
            "policy": self.config.policy,
            "nodes": [
                {
                    "name": n.name,
                    "http": n.spec.http,
                    "grpc": n.spec.grpc,
                    "up": n.up,
                    "failures": n.failures,
                    "outstanding": n.outstanding,
                    "ready_models": sorted(n.ready_models),
                }
                for n in (self.nodes[name] for name in self._order)
            ],
            "placement": dict(sorted(self.chooser.placement.items())),
            "costs": dict(sorted(self.costs().items())),
        }

    # ---- health checks -----------------------------------------------------------------------

    async def run(self) -> None:
        """Check every node each ``health_interval``; recompute placement on its period."""
        next_placement = time.monotonic() + self.config.placement_interval
        while True:
            await self.check_all()
            if self.config.policy == "lpt_packing" and time.monotonic() >= next_placement:
                await self.measure_costs()
                self._replace_placement()
                next_placement = time.monotonic() + self.config.placement_interval
            await asyncio.sleep(self.config.health_interval)

    async def check_all(self) -> None:
        before = {n.name: (n.up, n.ready_models) for n in self.nodes.values()}
        await asyncio.gather(*(self._check(n) for n in self.nodes.values()))
        after = {n.name: (n.up, n.ready_models) for n in self.nodes.values()}
        if before != after or not self.checked.is_set():
            self._replace_placement()
        self.checked.set()

    async def _check(self, node: Node) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self.config.connect_timeout + self.config.health_interval
        )
        try:
            ready = await self._get(node, "/v2/health/ready", timeout)
            index = await self._post(node, "/v2/repository/index", b"{}", timeout)
            if node.extensions is None or not node.up:
                meta = orjson.loads(await self._get_body(node, "/v2", timeout))
                node.extensions = tuple(str(e) for e in meta.get("extensions", ()))
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            node.failures += 1
            if node.up and node.failures >= self.config.health_failures:
                node.up = False
                node.removals += 1
                log.warning("node %s removed from routing: %d checks unanswered (%s)",
                            node.name, node.failures, _reason(exc))  # fmt: skip
            return
        node.failures = 0
        entries = orjson.loads(index) if index else []
        node.known_models = frozenset(str(e.get("name", "")) for e in entries)
        node.ready_models = frozenset(
            str(e.get("name", "")) for e in entries if e.get("state") == "READY"
        )
        if ready != 200:
            if node.up:
                node.removals += 1
                log.warning("node %s removed from routing: not ready", node.name)
            node.up = False
        elif not node.up:
            node.up = True
            log.info("node %s in routing: %d models ready", node.name, len(node.ready_models))

    async def _get(self, node: Node, path: str, timeout: aiohttp.ClientTimeout) -> int:
        async with self._session.get(node.spec.http + path, timeout=timeout) as resp:
            await resp.read()
            return resp.status

    async def _get_body(self, node: Node, path: str, timeout: aiohttp.ClientTimeout) -> bytes:
        async with self._session.get(node.spec.http + path, timeout=timeout) as resp:
            return await resp.read() if resp.status == 200 else b"{}"

    async def _post(
        self, node: Node, path: str, body: bytes, timeout: aiohttp.ClientTimeout
    ) -> bytes:
        async with self._session.post(node.spec.http + path, data=body, timeout=timeout) as resp:
            data = await resp.read()
            return data if resp.status == 200 else b"[]"

    # ---- lpt_packing -------------------------------------------------------------------------

    def costs(self) -> dict[str, float]:
        """Each model's cost: configured, else measured (execution seconds per second)."""
        models = set().union(*(n.known_models for n in self.nodes.values()))
        costs = {m: self.measured.get(m, 0.0) for m in models}
        costs.update(self.config.costs())
        return costs

    async def measure_costs(self) -> None:
        """Execution time per second of wall time since the last sample, from the nodes'
        statistics (compute_infer ns, summed over the nodes and versions)."""
        now = time.monotonic()
        elapsed = max(now - self._costs_at, 1e-3)
        self._costs_at = now
        totals: dict[str, float] = {}
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout * 2)
        for node in self.up_nodes():
            try:
                stats = orjson.loads(await self._get_body(node, "/v2/models/stats", timeout))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            sample = _compute_infer_ns(stats)
            for model, ns in sample.items():
                # a node's first sample is only a baseline: its totals predate the gateway
                delta = max(0, ns - node.infer_ns.get(model, ns))
                totals[model] = totals.get(model, 0.0) + delta / 1e9 / elapsed
            node.infer_ns = sample
        self.measured = totals

    def _replace_placement(self) -> None:
        if self.config.policy != "lpt_packing":
            return
        up = [n.name for n in self.up_nodes()]
        eligible = {m: [n for n in up if m in self.nodes[n].ready_models] for m in self.costs()}
        new = replace_placement(self.chooser.placement, self.costs(), up, eligible)
        if new != self.chooser.placement:
            log.info("placement: %s", ", ".join(f"{m}->{n}" for m, n in sorted(new.items())))
        self.chooser.placement = new


def _compute_infer_ns(stats: Mapping[str, Any]) -> dict[str, int]:
    sample: dict[str, int] = {}
    for entry in stats.get("model_stats", ()):
        name = str(entry.get("name", ""))
        ns = int(entry.get("inference_stats", {}).get("compute_infer", {}).get("ns", 0))
        sample[name] = sample.get(name, 0) + ns
    return sample


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
