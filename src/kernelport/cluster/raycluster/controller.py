"""The placement controller: slot actors on every Ray node, models packed onto them, and a
dead slot's models moved to the survivors.

Membership and process placement are Ray's (``ray.nodes()``, actors pinned to a node);
liveness is ours too: every ``heartbeat_interval`` each slot actor is asked whether its node
server still runs, and a slot that answers "no", raises (Ray says the actor or its machine is
dead) or misses ``heartbeat_misses`` answers in a row is dropped: out of the gateway's
routing at once, its actor killed, its models loaded on the survivors. Requests that were in
flight on it end with its connections (the gateway answers UNAVAILABLE), never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kernelport.cluster.nodes import NodeTable
from kernelport.cluster.raycluster.plan import pack
from kernelport.cluster.raycluster.slot import NodeServer
from kernelport.cluster.settings import NodeSpec

log = logging.getLogger("kernelport.cluster")


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """What the controller needs from ``kernelport cluster head``'s flags."""

    repository: str
    models: tuple[str, ...] = ()  # empty: every model of the repository
    cpus_per_slot: float = 1.0
    heartbeat_interval: float = 0.5
    heartbeat_misses: int = 3
    scan_interval: float = 2.0
    slot_start_timeout: float = 90.0
    server_args: tuple[str, ...] = ()


@dataclass(slots=True)
class Slot:
    """One slot actor as the controller knows it."""

    name: str
    ray_node: str
    actor: Any
    spec: NodeSpec
    free_memory: int
    info: dict[str, Any]
    misses: int = 0
    models: set[str] = field(default_factory=set)


def slots_wanted(resources: Mapping[str, float], cpus_per_slot: float) -> tuple[int, bool]:
    """How many slots a Ray node holds and whether they are GPU slots (one per GPU)."""
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return gpus, True
    return int(resources.get("CPU", 0) // cpus_per_slot) if cpus_per_slot > 0 else 0, False


class ClusterController:
    """Starts slot actors, places models on them, watches them; ``table`` is the gateway's."""

    def __init__(self, settings: ControllerSettings) -> None:
        import ray  # the cluster extra: only cluster mode pays for it

        self._ray = ray
        self.settings = settings
        self.slots: dict[str, Slot] = {}
        self.placement: dict[str, str] = {}
        self.unplaced: tuple[str, ...] = ()
        self.sizes: dict[str, int] = {}
        self.table: NodeTable | None = None
        self._session: aiohttp.ClientSession | None = None
        self._serial = 0
        self.last_recovery_s: float | None = None
        self._actor_class: Any = ray.remote(NodeServer)

    # ---- slots -------------------------------------------------------------------------------

    async def scan(self) -> list[Slot]:
        """Start the slots each live Ray node lacks; returns the new ones (not yet routed)."""
        nodes = await asyncio.to_thread(self._ray.nodes)
        started: list[asyncio.Task[Slot | None]] = []
        for node in nodes:
            node_id = str(node["NodeID"])
            if not node.get("Alive"):
                continue
            count, gpu = slots_wanted(node.get("Resources", {}), self.settings.cpus_per_slot)
            have = sum(1 for s in self.slots.values() if s.ray_node == node_id)
            host = str(node["NodeManagerAddress"])
            for _ in range(count - have):
                started.append(asyncio.create_task(self._start(node_id, host, count, gpu)))
        new = [s for s in await asyncio.gather(*started) if s is not None]
        for slot in new:
            self.slots[slot.name] = slot
            self.sizes.update(slot.info["model_sizes"])
            log.info(
                "slot %s up on Ray node %s: HTTP %s, gRPC %s, %d MiB free%s",
                slot.name,
                slot.ray_node[:8],
                slot.spec.http,
                slot.spec.grpc,
                slot.free_memory >> 20,
                f", GPU {slot.info['gpus']}" if slot.info["gpus"] else "",
            )
        return new

    async def _start(self, node_id: str, host: str, on_machine: int, gpu: bool) -> Slot | None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._serial += 1
        name = f"slot-{node_id[:8]}-{self._serial}"
        actor = self._actor_class.options(
            num_cpus=0 if gpu else self.settings.cpus_per_slot,
            num_gpus=1 if gpu else 0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(
            name,
            self.settings.repository,
            host,
            on_machine,
            self.settings.server_args,
            self.settings.slot_start_timeout,
        )
        try:
            info = await asyncio.wait_for(
                actor.info.remote(), self.settings.slot_start_timeout + 10
            )
        except Exception as exc:  # Ray raises its own error types for a failed actor
            log.warning("slot %s on %s did not start: %s", name, host, exc)
            self._ray.kill(actor, no_restart=True)
            return None
        spec = NodeSpec(name, str(info["http"]), str(info["grpc"]))
        return Slot(name, node_id, actor, spec, int(info["free_memory"]), info)

    def route(self, slots: list[Slot]) -> None:
        if self.table is not None:
            for slot in slots:
                self.table.add_node(slot.spec)

    # ---- placement ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        wanted = self.settings.models or tuple(self.sizes)
        return [m for m in wanted if m in self.sizes]

    async def place(self, rebalance: bool = False) -> None:
        """Pack the models onto the slots (keeping those already placed) and load the new.

        ``rebalance`` (new slots joined): a fresh packing replaces the kept one when it is
        better (lower busiest-slot cost, then fewer models on the fullest slot); a moved model
        is loaded on its new slot before it is unloaded from its old one."""
        costs_known = self.table.costs() if self.table is not None else {}
        costs = {m: costs_known.get(m, 0.0) for m in self.models()}
        names = sorted(self.slots)
        free = {
            n: self.slots[n].free_memory + sum(self.sizes.get(m, 0) for m in self.slots[n].models)
            for n in names
        }
        result = pack(costs, self.sizes, free, names, keep=self.placement)
        if rebalance:
            fresh = pack(costs, self.sizes, free, names)
            if not fresh.unplaced and _score(fresh.assignment, costs) < _score(
                result.assignment, costs
            ):
                result = fresh
        if result.unplaced and result.unplaced != self.unplaced:
            log.warning("no slot has memory for: %s", ", ".join(result.unplaced))
        self.unplaced = result.unplaced
        moves = [(m, s) for m, s in result.assignment.items() if self.placement.get(m) != s]
        old = {m: self.placement[m] for m, _ in moves if m in self.placement}
        self.placement = result.assignment
        loaded = await asyncio.gather(*(self._load(m, self.slots[s]) for m, s in moves))
        for (model, slot), ok in zip(moves, loaded, strict=True):
            if ok:
                self.slots[slot].models.add(model)
            elif model in old:
                self.placement[model] = old[model]  # the move failed: it stays where it runs
            else:
                self.placement.pop(model, None)  # tried again at the next scan
        if moves:
            log.info("placement: %s", ", ".join(f"{m}->{s}" for m, s in sorted(moves)))
            if self.table is not None:
                await self.table.check_all()  # route to the new places now
        for model, slot_name in old.items():
            if self.placement.get(model) != slot_name and slot_name in self.slots:
                await self._unload(model, self.slots[slot_name])

    async def _load(self, model: str, slot: Slot) -> bool:
        assert self._session is not None
        url = f"{slot.spec.http}/v2/repository/models/{model}/load"
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.slot_start_timeout)
            async with self._session.post(url, data=b"{}", timeout=timeout) as resp:
                body = await resp.read()
                if resp.status == 200:
                    return True
                log.warning("loading %s on %s: %d %s", model, slot.name, resp.status, body[:200])
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("loading %s on %s: %s", model, slot.name, exc)
        return False

    async def _unload(self, model: str, slot: Slot) -> None:
        assert self._session is not None
        slot.models.discard(model)
        if self.table is not None and slot.name in self.table.nodes:
            # route elsewhere before the model goes, not after the next health check
            node = self.table.nodes[slot.name]
            node.ready_models = node.ready_models - {model}
        url = f"{slot.spec.http}/v2/repository/models/{model}/unload"
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.slot_start_timeout)
            async with self._session.post(url, data=b"{}", timeout=timeout) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unloading %s from %s: %s", model, slot.name, exc)

    # ---- liveness ------------------------------------------------------------------------------

    async def _beat(self, slot: Slot) -> str | None:
        """None if the slot is well, else why it is not."""
        try:
            beat = await asyncio.wait_for(
                slot.actor.heartbeat.remote(), self.settings.heartbeat_interval * 2
            )
        except TimeoutError:
            slot.misses += 1
            if slot.misses >= self.settings.heartbeat_misses:
                return f"{slot.misses} heartbeats unanswered"
            return None
        except Exception as exc:  # RayActorError and kin: Ray knows it is dead
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        slot.misses = 0
        slot.free_memory = int(beat["free_memory"])
        return None if beat["alive"] else "its node server exited"

    async def check(self) -> None:
        """One round of heartbeats; drop the dead slots and re-place their models."""
        slots = list(self.slots.values())
        reasons = await asyncio.gather(*(self._beat(s) for s in slots))
        dead = [(s, r) for s, r in zip(slots, reasons, strict=True) if r is not None]
        if not dead:
            return
        began = time.monotonic()
        for slot, reason in dead:
            log.warning(
                "slot %s dropped (%s): re-placing %s",
                slot.name,
                reason,
                ", ".join(sorted(slot.models)) or "no models",
            )
            del self.slots[slot.name]
            if self.table is not None:
                self.table.remove_node(slot.name)
            for model in slot.models:
                self.placement.pop(model, None)
            self._ray.kill(slot.actor, no_restart=True)
        await self.place()
        self.last_recovery_s = time.monotonic() - began
        log.info("re-placement done in %.2f s", self.last_recovery_s)

    async def run(self) -> None:
        """Heartbeats every ``heartbeat_interval``; new Ray nodes every ``scan_interval``."""
        next_scan = time.monotonic() + self.settings.scan_interval
        while True:
            await self.check()
            if time.monotonic() >= next_scan:
                new = await self.scan()
                self.route(new)
                if new or self.unplaced or len(self.placement) < len(self.models()):
                    await self.place(rebalance=bool(new))
                next_scan = time.monotonic() + self.settings.scan_interval
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def start(self) -> list[Slot]:
        self._session = aiohttp.ClientSession()
        return await self.scan()

    async def attach(self, table: NodeTable) -> None:
        """Route through the gateway's ``table`` and place the models."""
        self.table = table
        await self.place()

    def status(self) -> dict[str, Any]:
        return {
            "slots": {
                n: {
                    "http": s.spec.http,
                    "grpc": s.spec.grpc,
                    "ray_node": s.ray_node,
                    "free_memory": s.free_memory,
                    "models": sorted(s.models),
                }
                for n, s in sorted(self.slots.items())
            },
            "placement": dict(sorted(self.placement.items())),
            "unplaced": list(self.unplaced),
            "last_recovery_s": self.last_recovery_s,
        }

    async def stop(self) -> None:
        await asyncio.gather(
            *(asyncio.wait_for(s.actor.stop.remote(), 15) for s in self.slots.values()),
            return_exceptions=True,
        )
        for slot in self.slots.values():
            self._ray.kill(slot.actor, no_restart=True)
        self.slots.clear()
        if self._session is not None:
            await self._session.close()


def _score(assignment: Mapping[str, str], costs: Mapping[str, float]) -> tuple[float, int]:
    load: dict[str, float] = {}
    count: dict[str, int] = {}
    for model, slot in assignment.items():
        load[slot] = load.get(slot, 0.0) + costs.get(model, 0.0)
        count[slot] = count.get(slot, 0) + 1
    return max(load.values(), default=0.0), max(count.values(), default=0)
