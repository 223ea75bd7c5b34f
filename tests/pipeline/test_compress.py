from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernelport.pipeline.compress import Packed, pack, unpack


def test_none_passes_the_tensor_itself() -> None:
    x = torch.randn(4, 8)
    assert pack(x, "none") is x and unpack(x) is x


def test_fp16_halves_the_bytes_and_keeps_half_precision() -> None:
    x = torch.randn(16, 64)
    packed = pack(x, "fp16")
    assert isinstance(packed, Packed) and packed.nbytes == x.numel() * 2
    back = unpack(packed)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, x, rtol=1e-3, atol=1e-3)


def test_int8_quarters_the_bytes_and_errs_by_at_most_half_a_step() -> None:
    x = torch.randn(16, 64) * 5
    packed = pack(x, "int8")
    assert isinstance(packed, Packed) and packed.nbytes == x.numel()
    step = float(x.abs().max()) / 127
    assert packed.scale == pytest.approx(step)
    assert float((unpack(packed) - x).abs().max()) <= step / 2 + 1e-6


def test_zeros_integers_and_unknown_modes() -> None:
    zeros = torch.zeros(3, 3)
    assert torch.equal(unpack(pack(zeros, "int8")), zeros)
    ids = torch.arange(6)
    assert pack(ids, "int8") is ids  # integer tensors travel as they are
    with pytest.raises(ValueError, match="unknown activation compression 'int4'"):
        pack(zeros, "int4")  # type: ignore[arg-type]


def test_a_stage_worker_runs_its_blocks_and_packs_for_the_next(tmp_path: Path) -> None:
    """The stage actor's class used directly, without Ray: what each stage does per message."""
    import io

    from kernelport.pipeline.runtime import StageWorker

    torch.manual_seed(0)
    block = torch.nn.Linear(4, 4)
    dim = torch.export.Dim("batch", min=1, max=64)
    buffer = io.BytesIO()
    torch.export.save(
        torch.export.export(block, (torch.zeros(2, 4),), dynamic_shapes=({0: dim},)), buffer
    )
    first = StageWorker([buffer.getvalue()], "int8", last=False, cores=[])
    last = StageWorker([buffer.getvalue()], "int8", last=True, cores=[])
    x = torch.randn(3, 4)
    handed_on = first.run(x)
    assert isinstance(handed_on, Packed) and handed_on.data.dtype == torch.int8
    out = last.run(handed_on)  # unpacks what came in; the last stage never packs
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, block(block(x)), atol=0.05, rtol=0.05)
    assert first.seconds_per_run() > 0 and first.pid() > 0
    assert StageWorker([buffer.getvalue()], "none", last=True, cores=[]).seconds_per_run() == 0
