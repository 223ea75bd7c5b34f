"""A sequence model for Triton's ``direct`` strategy, shared by the in-process and e2e tests:
it keeps each running sum by batch row (the sequence's slot, as models written for Triton's
direct do), refuses a row whose correlation id changed without a START, and answers with the
row and the instance each request ran in."""

from __future__ import annotations

SLOTS_PBTXT = """
backend: "python"
max_batch_size: 2
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "SUM" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "ROW" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "INSTANCE" data_type: TYPE_INT64 dims: [ 1 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  direct { max_queue_delay_microseconds: 2000 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
"""

SLOTS_PY = """
import numpy as np


class Model:
    def __init__(self):
        self.instance = id(self)  # each instance loads this module afresh: no counter
        self.sums = {}  # batch row -> the running sum of the sequence in that slot
        self.owner = {}  # batch row -> the correlation id in that slot

    def execute(self, inputs):
        rows = len(inputs["X"])
        out = np.zeros((rows, 1), np.int32)
        for row in range(rows):
            if not int(inputs["READY"][row, 0]):
                continue  # an empty slot: padding, nothing to keep
            corrid = int(inputs["CORRID"][row, 0])
            if int(inputs["START"][row, 0]):
                self.owner[row], self.sums[row] = corrid, 0
            elif self.owner.get(row) != corrid:
                raise RuntimeError(f"row {row} holds {self.owner.get(row)}, got {corrid}")
            self.sums[row] += int(inputs["X"][row, 0])
            out[row, 0] = self.sums[row]
        return {
            "SUM": out,
            "ROW": np.arange(rows, dtype=np.int32).reshape(rows, 1),
            "INSTANCE": np.full((rows, 1), self.instance, np.int64),
        }
"""


def slot_values(corrid: int) -> list[int]:
    """The values sequence ``corrid`` sends, 3 to 6 of them."""
    return [(corrid * 5 + i * 7) % 13 for i in range(3 + corrid % 4)]
