"""``kernelport fetch`` and ``serve --manifest`` through ``cli.main`` in process (the
subprocess tests in test_serve_manifest.py show the same against a real server)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kernelport import cli
from kernelport.config import Config

DATA = b"onnx bytes"


def local_manifest(tmp_path: Path, sha256: str | None = None) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "model.onnx").write_bytes(DATA)
    digest = sha256 or hashlib.sha256(DATA).hexdigest()
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "models:\n  m:\n    path: src\n"
        f"    files: [{{path: model.onnx, sha256: '{digest}'}}]\n"
        "    model_yaml: {backend: onnxruntime}\n"
    )
    return path


def test_fetch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = local_manifest(tmp_path)
    assert cli.main(["fetch", str(manifest), "--into", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "m" / "1" / "model.onnx").read_bytes() == DATA
    err = capsys.readouterr().err
    assert "m: 1/model.onnx sha256" in err and "m: ready in" in err
    assert cli.main(["fetch", str(manifest), "--into", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_fetch_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = local_manifest(tmp_path, "0" * 64)
    assert cli.main(["fetch", str(bad), "--into", str(tmp_path / "repo")]) == 2
    assert "kernelport fetch: model 'm'" in capsys.readouterr().err
    good = local_manifest(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert cli.main(["fetch", str(good), "--into", str(tmp_path / "a-file")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_manifest_repository_is_in_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert cli.manifest_repository() == Path("/somewhere/kernelport/models")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cli.manifest_repository() == Path.home() / ".cache" / "kernelport" / "models"


class FakeServer:
    configs: list[Config] = []

    def __init__(self, config: Config) -> None:
        self.configs.append(config)

    async def run(self) -> int:
        return 0


@pytest.mark.parametrize("explicit", [True, False])
def test_serve_manifest_fetches_then_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, explicit: bool
) -> None:
    import kernelport.server

    monkeypatch.setattr(kernelport.server, "Server", FakeServer)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    FakeServer.configs.clear()
    args = ["serve", "--grpc-transport", "grpcio", "--manifest", str(local_manifest(tmp_path))]
    if explicit:
        args += ["--model-repository", str(tmp_path / "repo")]
    assert cli.main(args) == 0
    [config] = FakeServer.configs
    where = tmp_path / "repo" if explicit else tmp_path / "xdg" / "kernelport" / "models"
    assert config.model_repository == (where,)
    assert config.manifest is None
    assert (where / "m" / "1" / "model.onnx").read_bytes() == DATA


def test_serve_manifest_that_fails(tmp_path: Path, capsys: Any) -> None:
    manifest = local_manifest(tmp_path, "0" * 64)
    args = ["serve", "--manifest", str(manifest), "--model-repository", str(tmp_path / "r")]
    assert cli.main(args) == 2
    assert "checksum mismatch" in capsys.readouterr().err
