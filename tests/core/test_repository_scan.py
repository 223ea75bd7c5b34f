"""Repository scanning, config files, staged upload directories and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelport.core.repository import (
    fingerprint,
    read_config,
    remove_staged,
    scan,
    source_at,
    stage_files,
)
from kernelport.errors import ServerError


def test_versions_and_config_files(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for name in ("1", "3", "01", "v2", ".tmp"):
        (model / name).mkdir(parents=True)
    (model / "model.yaml").write_text("backend: identity\n")
    (model / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    (tmp_path / "not_a_model").mkdir()
    sources = scan([tmp_path])
    assert list(sources) == ["m"]
    assert sources["m"].versions == (1, 3)
    document = read_config(sources["m"], None)
    assert document.raw == {"backend": "identity"}
    assert document.warnings == (
        f"{model / 'model.yaml'}: both model.yaml and config.pbtxt exist; using model.yaml",
    )


def test_pbtxt_needs_a_reader(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text("")
    source = source_at(tmp_path / "m")
    assert source is not None
    with pytest.raises(ServerError, match=r"config\.pbtxt: this server was built without"):
        read_config(source, None)


def test_staged_files_form_a_model_directory(tmp_path: Path) -> None:
    source = stage_files("up", {"file:1/model.onnx": b"x", "file:2/sub/w.bin": b"yz"})
    try:
        assert source.versions == (1, 2) and source.config_file is None
        assert (source.path / "2" / "sub" / "w.bin").read_bytes() == b"yz"
    finally:
        remove_staged(source)
    assert not source.path.exists()
    for key in ("file:../evil", "file:/etc/x", "file:"):
        with pytest.raises(ServerError, match="expected 'file:<version>/<path>'"):
            stage_files("up", {key: b"x"})
    with pytest.raises(ServerError, match="hold no numeric version directory"):
        stage_files("up", {"file:labels.txt": b"x"})


def test_fingerprint_sees_content_changes_not_caches(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text("a = 1\n")
    before = fingerprint(tmp_path)
    (tmp_path / "1" / "__pycache__").mkdir()
    (tmp_path / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "1" / ".model.py.swp").write_bytes(b"\0")
    assert fingerprint(tmp_path) == before
    (tmp_path / "1" / "model.py").write_text("a = 22\n")
    assert fingerprint(tmp_path) != before
