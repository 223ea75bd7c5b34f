"""Triton Python-backend models that read what a request carries (``request_id()``,
``parameters()``, ``correlation_id()``, ``flags()``), for tests/core/test_triton_requests.py
and tests/e2e/test_triton_requests_e2e.py.

- ``describe``: answers each request with one JSON string of what it was told (batched, up
  to 8, so several requests share one ``execute``)
- ``forward``: a BLS call to ``describe`` passing its own parameters plus ``via``
- ``tally`` (sequence model): the same JSON, for a sequence's requests
"""

from __future__ import annotations

from pathlib import Path

DESCRIBE_PY = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            told = {
                "id": request.request_id(),
                "parameters": json.loads(request.parameters()),
                "correlation_id": request.correlation_id(),
                "flags": request.flags(),
                "batch": len(requests),
            }
            out = np.array([[json.dumps(told, sort_keys=True).encode()]], dtype=object)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TOLD", out)]))
        return responses
"""

FORWARD_PY = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            params = {**json.loads(request.parameters()), "via": "forward"}
            call = pb_utils.InferenceRequest(
                model_name="describe",
                requested_output_names=["TOLD"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "X")],
                parameters=params,
            )
            response = call.exec()
            if response.has_error():
                raise pb_utils.TritonModelException(response.error().message())
            responses.append(pb_utils.InferenceResponse(response.output_tensors()))
        return responses
"""

_TENSORS = """
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "TOLD" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

DESCRIBE_PBTXT = (
    'backend: "python"\nmax_batch_size: 8\n'
    + _TENSORS
    + "dynamic_batching { max_queue_delay_microseconds: 200000 }\n"
)
FORWARD_PBTXT = 'backend: "python"\nmax_batch_size: 8\n' + _TENSORS
TALLY_PBTXT = (
    'backend: "python"\nmax_batch_size: 8\n'
    + _TENSORS
    + "sequence_batching { max_sequence_idle_microseconds: 60000000 }\n"
)


def write_triton_request_repository(repo: Path) -> Path:
    for name, config in (
        ("describe", DESCRIBE_PBTXT),
        ("forward", FORWARD_PBTXT),
        ("tally", TALLY_PBTXT),
    ):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        code = FORWARD_PY if name == "forward" else DESCRIBE_PY
        (repo / name / "1" / "model.py").write_text(code)
    return repo
