"""Hypothesis budgets for the fuzz suite (imported by each fuzz module).

``make test`` runs the ``ci`` profile: a fixed number of examples, derandomized (the same
inputs every run, so the suite cannot flake) and no example database. ``make fuzz`` runs
the ``deep`` profile: random inputs, many more examples (KERNELPORT_FUZZ_EXAMPLES to change).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_EXAMPLES = os.environ.get("KERNELPORT_FUZZ_EXAMPLES")

settings.register_profile(
    "ci",
    max_examples=int(_EXAMPLES or 60),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "deep",
    max_examples=int(_EXAMPLES or 2000),
    deadline=None,
    suppress_health_check=_SUPPRESSED,
)
settings.load_profile(os.environ.get("KERNELPORT_FUZZ_PROFILE", "ci"))
