"""Repository load and unload on every front end of a node (``--frontends N``).

As with client shared-memory regions (``core/shm_sync.py``), a load or unload through the
repository API is made on this front end first, exactly as with one process (the same
checks and errors; nothing that failed here goes further), then handed to the
``ModelPeers`` (the supervisor's link, outside core), which returns once every other live
front end made it too, or raises an error naming the front ends that failed. Nothing is
rolled back: a front end that failed a load keeps what its manager keeps after a failed
load (a serving model keeps its old versions, another is UNAVAILABLE with the reason).
Without peers nothing else runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kernelport.core.manager import ModelManager
from kernelport.errors import ErrorCode, ServerError


@dataclass(frozen=True, slots=True)
class ModelChange:
    """One repository load or unload call's arguments."""

    op: Literal["load", "unload"]
    name: str
    config: str | None = None  # load: a config override (JSON)
    files: Mapping[str, bytes] = field(default_factory=dict)  # load: ``file:`` parameters
    unload_dependents: bool = False
    #: unload: the dependents unloaded with ``name`` here, so a front end that starts later
    #: does not load them again
    also: tuple[str, ...] = ()


async def apply_model(manager: ModelManager, change: ModelChange) -> None:
    """Make ``change`` in ``manager`` (raises what the manager raises; unloading a model
    that is not loaded here is already done)."""
    if change.op == "load":
        await manager.load(change.name, change.config, change.files)
        return
    try:
        await manager.unload(change.name, change.unload_dependents)
    except ServerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise


def loaded(manager: ModelManager) -> set[str]:
    """The models with versions serving now."""
    return {e.name for e in manager.entries() if e.versions}


class ModelPeers(Protocol):
    def check_model(self, change: ModelChange) -> None:
        """Raise a ``ServerError`` if ``change`` cannot reach the other front ends (before
        it is made here)."""

    async def publish_model(self, change: ModelChange) -> None:
        """Return once every other live front end made ``change`` (made here already); raise
        a ``ServerError`` naming those that failed."""
