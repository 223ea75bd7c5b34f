"""Size and concurrency limits, passed through constructors to the codecs and the data plane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may cost. Each field has a ``Config`` field and CLI flag of its name."""

    max_request_bytes: int = 256 * MIB  # an HTTP body as sent (--max-request-bytes)
    max_inflated_bytes: int = 256 * MIB  # an HTTP body once gzip/deflate is undone
    max_tensor_elements: int = 2**28  # elements in one tensor, checked before any allocation
    max_in_flight: int = 4096  # inference requests in flight across the server

    @classmethod
    def of(cls, config: LimitSettings) -> Limits:
        return cls(
            config.max_request_bytes,
            config.max_inflated_bytes,
            config.max_tensor_elements,
            config.max_in_flight,
        )


class LimitSettings(Protocol):
    """What ``Limits.of`` reads (``Config`` has it); a protocol so limits stays a leaf."""

    @property
    def max_request_bytes(self) -> int: ...
    @property
    def max_inflated_bytes(self) -> int: ...
    @property
    def max_tensor_elements(self) -> int: ...
    @property
    def max_in_flight(self) -> int: ...
