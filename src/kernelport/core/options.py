"""What a request's parameters ask of the queue: ``timeout`` and ``priority``, checked."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kernelport.core.model_config import DynamicBatching
from kernelport.errors import ErrorCode, ServerError


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What a request's parameters ask of the queue, already checked and defaulted."""

    timeout_ns: int = 0  # 0 = wait as long as it takes
    priority: int = 0  # the level it queues at (1 = most urgent); 0 when the model has none


# Triton carries these as int64 (timeout, microseconds) and uint64 (priority).
_PARAM_MAX = {"timeout": 2**63 - 1, "priority": 2**64 - 1}


def request_options(
    parameters: Mapping[str, Any] | None, policy: DynamicBatching | None
) -> RequestOptions:
    """Parse ``timeout`` (us) and ``priority`` and apply the model's defaults to them.

    Both are checked even when the model has no batcher or no priority levels, so a bad
    value is the client's error whatever model it reaches.
    """
    params = parameters or {}
    timeout_us = _int_param(params, "timeout")
    asked = _int_param(params, "priority")
    if policy is None:
        return RequestOptions(timeout_us * 1000)
    timeout_ns = timeout_us * 1000 or policy.default_timeout_us * 1000
    level = 0
    if levels := policy.priority_levels:
        # Triton's rule: 0 or a level past priority_levels means the default level.
        level = asked if 1 <= asked <= levels else (policy.default_priority_level or levels)
    return RequestOptions(timeout_ns, level)


def _int_param(params: Mapping[str, Any], name: str) -> int:
    value = params.get(name, 0)
    # Only integers: bools, strings and fractions are client mistakes, and inf/NaN would
    # otherwise escape as a 500 (int(inf) raises OverflowError). An integral float (1e6 from
    # a JSON encoder) is the same number.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServerError(
            ErrorCode.INVALID_ARGUMENT, f"parameter '{name}' must be an integer, got {value!r}"
        )
    limit = _PARAM_MAX.get(name, 2**63 - 1)
    if not 0 <= value <= limit:
        raise ServerError(
            ErrorCode.INVALID_ARGUMENT,
            f"parameter '{name}' must be between 0 and {limit}, got {value}",
        )
    return value
