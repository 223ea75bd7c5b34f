"""Which node serves a model: the three routing policies and LPT placement (pure functions).

LPT (longest processing time first) is the classic greedy schedule for identical machines:
sort the jobs by cost, longest first, and give each to the machine with the least work so
far. Its makespan is within 4/3 of the optimum, and it is cheap enough to recompute often.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# A new placement replaces the current one only when it lowers the busiest node's load by
# more than this fraction: measured costs wobble, and moving a model costs its warm caches.
HYSTERESIS = 0.1


def lpt_assign(
    costs: Mapping[str, float],
    nodes: Sequence[str],
    eligible: Mapping[str, Sequence[str]] | None = None,
    start: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Place each model of ``costs`` on one node: longest first, onto the least loaded node.

    ``eligible``: the nodes that may take each model (default: all). ``start``: models already
    placed (their costs count as load before the rest are placed). Ties go to the node with
    fewer models, then the earlier node, so models without cost spread evenly.
    """
    placed = dict(start or {})
    load = {n: 0.0 for n in nodes}
    count = dict.fromkeys(nodes, 0)
    for model, node in placed.items():
        load[node] += costs.get(model, 0.0)
        count[node] += 1
    order = sorted((m for m in costs if m not in placed), key=lambda m: (-costs[m], m))
    for model in order:
        allowed = [n for n in nodes if eligible is None or n in eligible.get(model, ())]
        if not allowed:
            continue
        best = min(allowed, key=lambda n: (load[n], count[n], nodes.index(n)))
        placed[model] = best
        load[best] += costs[model]
        count[best] += 1
    return placed


def makespan(assignment: Mapping[str, str], costs: Mapping[str, float]) -> float:
    """The busiest node's total cost under ``assignment``."""
    load: dict[str, float] = {}
    for model, node in assignment.items():
        load[node] = load.get(node, 0.0) + costs.get(model, 0.0)
    return max(load.values(), default=0.0)


def replace_placement(
    current: Mapping[str, str],
    costs: Mapping[str, float],
    nodes: Sequence[str],
    eligible: Mapping[str, Sequence[str]],
) -> dict[str, str]:
    """The next placement: the current one, unless a fresh LPT assignment is really better.

    Models whose node no longer has them (or is gone) and new models are placed onto the
    kept ones' loads; the fresh assignment wins only if its makespan is lower by more than
    ``HYSTERESIS``.
    """
    kept = {
        m: n for m, n in current.items() if m in costs and n in nodes and n in eligible.get(m, ())
    }
    patched = lpt_assign(costs, nodes, eligible, kept)
    fresh = lpt_assign(costs, nodes, eligible)
    if makespan(fresh, costs) < makespan(patched, costs) * (1 - HYSTERESIS):
        return fresh
    return patched


class Chooser:
    """Picks one node among a model's candidates by the configured policy.

    ``outstanding``: requests the gateway has in flight to each node; ``placement``: the
    lpt_packing assignment of models to nodes.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._turn: dict[str, int] = {}
        self.placement: dict[str, str] = {}

    def choose(self, model: str, candidates: Sequence[str], outstanding: Mapping[str, int]) -> str:
        """One of ``candidates`` (non-empty, in configuration order) for ``model``."""
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        first = turn % len(candidates)
        rotated = [*candidates[first:], *candidates[:first]]
        if self.policy == "least_outstanding":
            # min() keeps the first of equals: ties rotate, so idle nodes share the work
            return min(rotated, key=lambda n: outstanding.get(n, 0))
        if self.policy == "lpt_packing":
            placed = self.placement.get(model)
            if placed is not None and placed in candidates:
                return placed
            # its node lost it or went away: fail over to the least busy that has it
            return min(rotated, key=lambda n: outstanding.get(n, 0))
        return rotated[0]
