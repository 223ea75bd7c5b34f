"""Client shared-memory regions registered on every front end of a node (``--frontends N``).

A register or unregister call is applied to this front end's registry first, exactly as
with one process (so a client gets the same errors, and nothing that failed here goes
further), then handed to the ``RegionPeers`` (the supervisor's link, outside core), which
returns once every other live front end applied it, or raises after undoing it. Without
peers (one process) the calls are the registry's own and nothing else runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from kernelport.core.shm import Kind, SharedMemoryRegistry
from kernelport.errors import ErrorCode, ServerError


@dataclass(frozen=True, slots=True)
class RegionChange:
    """One register or unregister call's arguments (an empty ``name`` unregisters a kind)."""

    op: Literal["register", "unregister"]
    kind: Kind
    name: str
    key: str = ""  # system
    offset: int = 0  # system
    byte_size: int = 0
    raw_handle: bytes = b""  # CUDA
    device_id: int = 0  # CUDA


def apply(registry: SharedMemoryRegistry, change: RegionChange) -> None:
    """Make ``change`` in ``registry`` (raises what the registry raises)."""
    if change.op == "unregister":
        registry.unregister(change.kind, change.name)
    elif change.kind == "system":
        registry.register_system(change.name, change.key, change.offset, change.byte_size)
    else:
        registry.register_cuda(change.name, change.raw_handle, change.device_id, change.byte_size)


def undo(registry: SharedMemoryRegistry, change: RegionChange) -> None:
    """Take back a register ``change`` applied here (gone already is fine)."""
    if change.op != "register":
        return
    try:
        registry.unregister(change.kind, change.name)
    except ServerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise


class RegionPeers(Protocol):
    async def publish(self, change: RegionChange) -> None:
        """Return once every other front end applied ``change`` (applied here already);
        on failure undo it here and raise a ``ServerError`` naming who failed."""


class SharedRegions:
    """The register/unregister verbs of both front ends: local first, then the peers."""

    def __init__(self, registry: SharedMemoryRegistry, peers: RegionPeers | None = None) -> None:
        self.registry = registry
        self.peers = peers

    async def _share(self, change: RegionChange) -> None:
        apply(self.registry, change)
        if self.peers is not None:
            await self.peers.publish(change)

    async def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        await self._share(RegionChange("register", "system", name, key, offset, byte_size))

    async def register_cuda(
        self, name: str, raw_handle: bytes, device_id: int, byte_size: int
    ) -> None:
        await self._share(
            RegionChange(
                "register", "cuda", name, byte_size=byte_size, raw_handle=raw_handle,
                device_id=device_id,
            )
        )  # fmt: skip

    async def unregister(self, kind: Kind, name: str = "") -> None:
        await self._share(RegionChange("unregister", kind, name))
