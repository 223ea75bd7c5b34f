"""While a Server serves, the cycle collector runs less often (``server.GC_THRESHOLD``); its
shutdown gives the process its own thresholds back (tests and embedding applications)."""

from __future__ import annotations

import gc
from pathlib import Path

from helpers import identity_config, write_model

from kernelport.config import Config
from kernelport.server import GC_THRESHOLD, Server


async def test_the_gc_threshold_while_serving_and_after(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "echo", identity_config("FP32", [2]))
    config = Config(model_repository=(repo,), host="127.0.0.1", http_port=0, grpc_port=0,
                    metrics_port=0, grpc_transport="grpcio")  # fmt: skip
    before = gc.get_threshold()
    assert before != GC_THRESHOLD
    server = Server(config)
    await server.startup()
    try:
        assert gc.get_threshold() == GC_THRESHOLD
    finally:
        await server.shutdown()
    assert gc.get_threshold() == before
