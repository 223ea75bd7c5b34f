"""Memory-aware LPT placement of models onto cluster slots (pure functions).

The gateway's ``lpt_assign`` balances cost alone; across machines a model must also fit in
the free memory its slot advertises. Longest first, each model goes to the least loaded slot
that still has room for it; a model that fits nowhere stays unplaced (and is reported).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """Where each model runs, and the models no slot had memory for."""

    assignment: dict[str, str]
    unplaced: tuple[str, ...]


def pack(
    costs: Mapping[str, float],
    sizes: Mapping[str, int],
    free: Mapping[str, int],
    slots: Sequence[str],
    keep: Mapping[str, str] | None = None,
) -> Placement:
    """Place every model of ``costs`` on one of ``slots``.

    ``sizes``: each model's memory in bytes (missing: 0); ``free``: each slot's free memory
    in bytes; ``keep``: models already running (kept where their slot is still listed, their
    cost and memory counted first), so a re-placement moves only the models that lost a slot.
    Ties go to the slot with fewer models, then the earlier slot.
    """
    load = {s: 0.0 for s in slots}
    room = {s: int(free.get(s, 0)) for s in slots}
    count = dict.fromkeys(slots, 0)
    assignment: dict[str, str] = {}
    for model, slot in (keep or {}).items():
        if model in costs and slot in load:
            assignment[model] = slot
            load[slot] += costs[model]
            room[slot] -= sizes.get(model, 0)
            count[slot] += 1
    order = sorted(
        (m for m in costs if m not in assignment),
        key=lambda m: (-costs[m], -sizes.get(m, 0), m),
    )
    unplaced: list[str] = []
    for model in order:
        need = sizes.get(model, 0)
        fits = [s for s in slots if room[s] >= need]
        if not fits:
            unplaced.append(model)
            continue
        best = min(fits, key=lambda s: (load[s], count[s], slots.index(s)))
        assignment[model] = best
        load[best] += costs[model]
        room[best] -= need
        count[best] += 1
    return Placement(assignment, tuple(unplaced))
