"""Model names, versions and upload keys from the wire (core/names.py), staging that deletes
only its own directory, and the upload opt-in setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelport.config import Config
from kernelport.core.names import (
    ECHO_CHARS,
    check_lookup_name,
    check_model_name,
    parse_version,
    shown,
    upload_paths,
)
from kernelport.core.repository import ModelSource, remove_staged, scan, stage_files
from kernelport.errors import ErrorCode, ServerError


@pytest.mark.parametrize("name", ["simple", "résumé", "模型", "a b", "m-1_2.onnx", "x" * 255])
def test_valid_names_pass_unchanged(name: str) -> None:
    assert check_model_name(name) == name
    assert check_lookup_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        (".", "relative directory"),
        ("..", "relative directory"),
        (".hidden", "starts with '.'"),
        ("../../victim/evil", "starts with '.'"),
        ("/etc/passwd", "path separator"),
        ("a/b", "path separator"),
        ("..\\..\\evil", "starts with '.'"),
        ("a\\b", "path separator"),
        ("a\0b", "non-printable"),
        ("a\nb", "non-printable"),
        ("a\u200bb", "non-printable"),  # zero-width space: invisible in any listing
        ("\ud800", "non-printable"),  # a lone surrogate cannot even be encoded
        ("é" * 128, "256 bytes long"),  # 128 characters, but 256 bytes of UTF-8
        ("x" * 10_000, "10000 bytes long"),
    ],
)
def test_invalid_names_are_invalid_argument(name: str, problem: str) -> None:
    with pytest.raises(ServerError) as info:
        check_model_name(name)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert problem in info.value.message
    assert len(info.value.message) < 200  # the name is echoed, but only its start


def test_a_lookup_of_a_name_too_long_to_exist_is_not_found() -> None:
    with pytest.raises(ServerError) as info:
        check_lookup_name("m" * 10_000)
    assert info.value.code is ErrorCode.NOT_FOUND
    assert len(info.value.message) < 200
    with pytest.raises(ServerError) as malformed:
        check_lookup_name("../" * 5_000)  # malformed stays malformed, however long
    assert malformed.value.code is ErrorCode.INVALID_ARGUMENT


def test_shown_truncates_and_escapes() -> None:
    assert shown("abc") == "abc"
    assert shown("y" * 1000) == "y" * ECHO_CHARS + "..."
    assert shown("a\0b\n") == "a\\x00b\\n"


@pytest.mark.parametrize(("text", "value"), [("", None), ("0", 0), ("7", 7), ("0012", 12),
                                             (str(2**63 - 1), 2**63 - 1)])  # fmt: skip
def test_versions_are_ascii_digits(text: str, value: int | None) -> None:
    assert parse_version(text) == value


UNICODE_DIGITS = ["\u0661", "\u00b2", "\uff11", "1\u00b2"]  # Arabic-Indic, superscript, fullwidth


@pytest.mark.parametrize(
    "text", [*UNICODE_DIGITS, "-1", "+1", " 1", "1.0", "v1", str(2**63), "9" * 5000]
)
def test_other_versions_are_invalid_argument(text: str) -> None:
    with pytest.raises(ServerError) as info:
        parse_version(text, "model_version")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "model_version" in info.value.message and "not a version number" in info.value.message
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    "keys",
    [
        ["file:1//model.onnx"],
        ["file:./1/model.onnx"],
        ["file:1/./model.onnx"],
        ["file:1/model.onnx/"],
        ["file:1/../../x"],
        ["file:/etc/x"],
        ["file:"],
        ["file:1\\model.onnx"],
        ["file:1/mo\0del.onnx"],
        ["file:1/model.onnx", "file:1"],  # "1" would be both a file and a directory
        ["file:1/sub", "file:1/sub/w.bin"],
    ],
)
def test_odd_or_conflicting_upload_keys_are_invalid_argument(keys: list[str]) -> None:
    with pytest.raises(ServerError) as info:
        upload_paths(keys)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "load parameter" in info.value.message


def test_staging_rejects_odd_keys_and_bad_names_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    good = {"file:1/model.onnx": b"x"}
    for files in ({**good, "file:1//model.onnx": b"y"}, {**good, "file:1": b"y"}):
        with pytest.raises(ServerError, match="load parameter"):
            stage_files("up", files)
    for name in ("..", "../../victim/evil", str(tmp_path / "abs"), "a/b"):
        with pytest.raises(ServerError, match="model name"):
            stage_files(name, good)
    assert list(tmp_path.iterdir()) == []  # every failed staging removed its directory


def test_remove_staged_deletes_only_the_recorded_temporary_root(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "evil").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    remove_staged(ModelSource("evil", victim / "evil", None, (1,)))  # not staged: no-op
    assert (victim / "keep.txt").exists()

    source = stage_files("up", {"file:1/model.onnx": b"x"})
    assert source.staged_root is not None and source.path.parent == source.staged_root
    remove_staged(source)
    assert not source.staged_root.exists()


def test_scan_skips_directories_no_request_could_name(tmp_path: Path) -> None:
    for name in ("good", "bad\nname", ".hidden"):
        (tmp_path / name / "1").mkdir(parents=True)
    assert list(scan([tmp_path])) == ["good"]


def test_allow_model_upload_setting() -> None:
    assert Config().allow_model_upload is False
    for raw, want in (("1", True), ("true", True), ("YES", True), ("0", False), ("no", False),
                      ("False", False)):  # fmt: skip
        env = {"KERNELPORT_ALLOW_MODEL_UPLOAD": raw}
        assert Config.load(None, environ=env).allow_model_upload is want, raw
    with pytest.raises(ValueError, match="allow_model_upload: expected true"):
        Config.load(None, environ={"KERNELPORT_ALLOW_MODEL_UPLOAD": "maybe"})
    env = {"KERNELPORT_ALLOW_MODEL_UPLOAD": "0"}
    assert Config.load(None, {"allow_model_upload": True}, env).allow_model_upload is True
