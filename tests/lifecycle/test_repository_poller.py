"""The poller's reconciliation on a fake clock: what loads, reloads and unloads, and when."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kernelport.core.repository import ModelSource, scan
from kernelport.lifecycle.poller import RepositoryPoller

DEBOUNCE = 1.0


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Manager:
    """Records what the poller asks for; scans the real directory."""

    def __init__(self, root: Path) -> None:
        self.repositories = (root,)
        self.calls: list[tuple[str, str]] = []
        self.loaded: set[str] = set()

    async def rescan(self) -> dict[str, ModelSource]:
        return scan(list(self.repositories))

    async def load(self, name: str) -> None:
        self.calls.append(("load", name))
        self.loaded.add(name)

    async def unload(self, name: str, forget: bool = False) -> None:
        assert forget
        self.calls.append(("unload", name))
        self.loaded.discard(name)

    def known(self, name: str) -> bool:
        return name in self.loaded


def _write(root: Path, name: str, content: bytes) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "model.onnx").write_bytes(content)


async def _step(poller: RepositoryPoller, clock: _Clock, seconds: float) -> Any:
    clock.now += seconds
    return await poller.reconcile()


async def test_changes_apply_only_after_a_quiet_period(tmp_path: Path) -> None:
    clock, manager = _Clock(), _Manager(tmp_path)
    poller = RepositoryPoller(manager, interval=15, debounce=DEBOUNCE, clock=clock)  # type: ignore[arg-type]

    _write(tmp_path, "a", b"part")  # a copy has started
    assert await _step(poller, clock, 0) == clock.now + DEBOUNCE  # due then, if quiet
    _write(tmp_path, "a", b"partial!")  # ... and goes on before the quiet period ends
    await _step(poller, clock, 0.8)
    await _step(poller, clock, 0.8)  # 0.8 s quiet: not yet
    assert manager.calls == []
    assert await _step(poller, clock, 0.3) is None  # 1.1 s quiet: loaded once, complete
    assert manager.calls == [("load", "a")]

    await _step(poller, clock, 5)
    assert manager.calls == [("load", "a")]  # unchanged: nothing to do

    _write(tmp_path, "a", b"version two")
    await _step(poller, clock, 0)
    await _step(poller, clock, DEBOUNCE)
    assert manager.calls[-1] == ("load", "a")  # a change reloads
    assert len(manager.calls) == 2

    (tmp_path / "a" / "1" / "model.onnx").unlink()
    (tmp_path / "a" / "1").rmdir()
    (tmp_path / "a").rmdir()
    await _step(poller, clock, 0)
    assert manager.calls[-1] == ("load", "a")  # removal waits for the quiet period too
    await _step(poller, clock, DEBOUNCE)
    assert manager.calls[-1] == ("unload", "a")


async def test_a_change_reverted_within_the_quiet_period_does_nothing(tmp_path: Path) -> None:
    clock, manager = _Clock(), _Manager(tmp_path)
    poller = RepositoryPoller(manager, interval=15, debounce=DEBOUNCE, clock=clock)  # type: ignore[arg-type]
    _write(tmp_path, "b", b"one")
    await _step(poller, clock, 0)
    await _step(poller, clock, DEBOUNCE)
    assert manager.calls == [("load", "b")]
    model = tmp_path / "b" / "1" / "model.onnx"
    stat = model.stat()
    model.write_bytes(b"two")
    await _step(poller, clock, 0)
    model.write_bytes(b"one")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # exactly as it was
    await _step(poller, clock, DEBOUNCE)
    assert manager.calls == [("load", "b")]
