"""Identity backend: output i is input i. Lets the whole server run with no ML framework.

Used by tests and demos (datatype round trips, batching behaviour). To stand in for a slow
model in scheduling tests, backend parameter ``delay_ms`` makes each execution sleep, and
``delay_ms_from`` names an input whose largest value is slept (in ms) per execution.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kernelport.core.backend import Arrays, LoadContext
from kernelport.errors import invalid


class IdentityBackend:
    name = "identity"
    platform = ""

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if "outputs" not in raw and "inputs" in raw:
            return raw | {
                "outputs": [dict(spec, name=f"OUTPUT{i}") for i, spec in enumerate(raw["inputs"])]
            }
        return raw

    def load(self, context: LoadContext) -> IdentityInstance:
        config = context.config
        if len(config.inputs) != len(config.outputs):
            raise invalid(
                f"identity model '{config.name}' needs as many outputs as inputs "
                f"({len(config.inputs)} vs {len(config.outputs)})"
            )
        pairs = [(i.name, o.name) for i, o in zip(config.inputs, config.outputs, strict=True)]
        delay = float(config.parameters.get("delay_ms", 0)) / 1000.0
        return IdentityInstance(pairs, delay, config.parameters.get("delay_ms_from"))


class IdentityInstance:
    def __init__(
        self, pairs: list[tuple[str, str]], delay_s: float, delay_from: str | None
    ) -> None:
        self._pairs = pairs
        self._delay_s = delay_s
        self._delay_from = delay_from

    def execute(self, inputs: Arrays) -> Arrays:
        delay = self._delay_s
        if self._delay_from is not None and inputs[self._delay_from].size:
            delay += float(inputs[self._delay_from].max()) / 1000.0
        if delay:
            time.sleep(delay)
        return {out: inputs[inp] for inp, out in self._pairs}

    def unload(self) -> None:
        pass
