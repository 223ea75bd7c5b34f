"""One typed Config: every field is a CLI flag, a KERNELPORT_* variable and a file key."""

from __future__ import annotations

import argparse
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
import yaml

from kernelport.cli import _parser, config_from_args, main
from kernelport.config import Config, env_var

FIELDS = Config.model_fields


def _kind(name: str) -> Any:
    """The type of one value of the field: X for X, X | None and tuple[X, ...]."""
    annotation = FIELDS[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is tuple:
        annotation = get_args(annotation)[0]
    return annotation


def _is_list(name: str) -> bool:
    return get_origin(FIELDS[name].annotation) is tuple


def _serve_actions() -> dict[str, argparse.Action]:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in commands.choices["serve"]._actions}


def _samples(tmp_path: Path) -> dict[str, Any]:
    """A value unlike the default for every field, derived from its type."""
    samples: dict[str, Any] = {}
    for name, field in FIELDS.items():
        kind, default = _kind(name), field.get_default(call_default_factory=True)
        if get_origin(kind) is Literal:
            value: Any = next(c for c in get_args(kind) if c != default)
        elif kind is bool:
            value = not default
        elif kind in (int, float):
            value = default + (1 if kind is int else 0.5)
        elif kind is Path:
            value = tmp_path / name
        else:
            value = f"{name}-value"
        if _is_list(name):
            value = (value, tmp_path / f"{name}-2") if kind is Path else (value, "two")
        samples[name] = value
    # The cross-field rules: load_model needs explicit mode; the key file must be readable.
    samples["model_control_mode"] = "explicit"
    samples["api_keys"] = ("key-1", "key-2")
    samples["api_key_file"].write_text("# a comment\nkey-from-file\n")
    return samples


def _argv(samples: dict[str, Any]) -> list[str]:
    actions, argv = _serve_actions(), ["serve"]
    for name, value in samples.items():
        flag = actions[name].option_strings[0]
        if value is True:
            argv.append(flag)
        else:
            for item in value if _is_list(name) else (value,):
                argv += [flag, str(item)]
    return argv


def _environ(samples: dict[str, Any]) -> dict[str, str]:
    def text(name: str, value: Any) -> str:
        if not _is_list(name):
            return "yes" if value is True else str(value)
        separator = os.pathsep if _kind(name) is Path else ","
        return separator.join(str(v) for v in value)

    return {env_var(name): text(name, value) for name, value in samples.items()}


def _file(samples: dict[str, Any], tmp_path: Path) -> Path:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    file = tmp_path / "kernelport.yaml"
    file.write_text(yaml.safe_dump({k.replace("_", "-"): plain(v) for k, v in samples.items()}))
    return file


def test_every_field_round_trips_through_flag_environment_and_file(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    expected = Config(**samples)
    for name in FIELDS:  # every setting is exercised with a value other than its default
        assert getattr(expected, name) != FIELDS[name].get_default(call_default_factory=True), name
    assert expected.api_keys == ("key-1", "key-2", "key-from-file")
    from_flags = config_from_args(_parser().parse_args(_argv(samples)), environ={})
    from_env = Config.load(None, environ=_environ(samples))
    from_file = Config.load(_file(samples, tmp_path), environ={})
    for name in FIELDS:
        want = getattr(expected, name)
        assert (getattr(from_flags, name), getattr(from_env, name), getattr(from_file, name)) == (
            want,
            want,
            want,
        ), name
    assert from_flags == from_env == from_file == expected


def test_every_field_is_in_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    actions = _serve_actions()
    assert set(FIELDS) <= set(actions)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in FIELDS.items():
        flag = actions[name].option_strings[0]
        assert flag == ("--api-key" if name == "api_keys" else "--" + name.replace("_", "-"))
        assert flag in out, name
        assert " ".join((field.description or "").split())[:40] in out, name
    assert "--http-port PORT KServe V2 HTTP port (0: any free port) (default: 8000)" in out
    assert "--drain-timeout SECONDS" in out and "(default: 30)" in out


def test_flag_kinds_come_from_the_types() -> None:
    actions = _serve_actions()
    for name in FIELDS:
        action, kind = actions[name], _kind(name)
        assert action.default is None, name  # unset flags leave the file and environment be
        if get_origin(kind) is Literal:
            assert tuple(action.choices or ()) == get_args(kind), name
        elif kind is bool:
            assert isinstance(action, argparse._StoreTrueAction), name
        else:
            assert action.type is kind, name
        assert isinstance(action, argparse._AppendAction) is _is_list(name), name


def test_choices_come_from_the_types_and_ignore_case() -> None:
    literal = [n for n in FIELDS if get_origin(_kind(n)) is Literal]
    assert {"log_level", "scheduler", "auth_scope", "model_control_mode"} <= set(literal)
    for name in literal:
        allowed = get_args(_kind(name))
        expected = re.escape("|".join(allowed))
        with pytest.raises(ValueError, match=rf"^setting {name}: expected {expected}, got"):
            Config.from_mapping({name: "bogus"})
        value = allowed[-1]
        assert getattr(Config.load(None, environ={env_var(name): value.upper()}), name) == value


def _bad_value(name: str) -> Any:
    kind = _kind(name)
    if get_origin(kind) is Literal:
        return "bogus"
    return {bool: "maybe", int: "x", float: "x"}.get(kind, 5)  # 5 is no text, path or list


def test_errors_name_the_setting() -> None:
    for name in FIELDS:
        with pytest.raises(ValueError, match=rf"^setting {name}: expected .*, got") as err:
            Config.from_mapping({name: _bad_value(name)})
        assert "pydantic" not in str(err.value)
    with pytest.raises(ValueError, match=r"^unknown setting\(s\): http_prot, x$"):
        Config.from_mapping({"http_prot": 1, "x": 2})


def test_bounds_name_the_setting() -> None:
    checked = set()
    for name, field in FIELDS.items():
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Gt):
                bad, expected = bound.gt, f"a number above {bound.gt}"
            elif isinstance(bound, annotated_types.Ge):
                bad, expected = bound.ge - 1, f"{bound.ge} or more"
            elif isinstance(bound, annotated_types.Le):
                bad, expected = bound.le + 1, f"at most {bound.le}"
            else:
                continue
            with pytest.raises(ValueError, match=rf"^setting {name}: expected {expected}, got"):
                Config.from_mapping({name: bad})
            checked.add(name)
    assert {"http_port", "max_request_bytes", "grpc_max_message_bytes", "trace_count"} <= checked


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    file = tmp_path / "kp.yaml"
    file.write_text("http_port: 7000\nallow-model-upload: true\n")
    env = {"KERNELPORT_HTTP_PORT": "7001", "KERNELPORT_ALLOW_MODEL_UPLOAD": "off"}

    def config(*argv: str, environ: dict[str, str] = env, config_file: bool = True) -> Config:
        extra = ["--config", str(file)] if config_file else []
        return config_from_args(_parser().parse_args(["serve", *extra, *argv]), environ)

    assert (config().http_port, config().allow_model_upload) == (7001, False)
    flagged = config("--http-port", "7002", "--allow-model-upload")
    assert (flagged.http_port, flagged.allow_model_upload) == (7002, True)
    from_file = config(environ={})
    assert (from_file.http_port, from_file.allow_model_upload) == (7000, True)
    default = config(environ={}, config_file=False)
    assert (default.http_port, default.allow_model_upload) == (8000, False)


@pytest.mark.parametrize(
    ("raw", "want"),
    [(t, True) for t in ("1", "true", "yes", "on", "TRUE", "Yes", " On ")]
    + [(f, False) for f in ("0", "false", "no", "off", "FALSE", "No", "")],
)
def test_bools_from_the_environment(raw: str, want: bool) -> None:
    config = Config.load(None, environ={"KERNELPORT_ALLOW_MODEL_UPLOAD": raw})
    assert config.allow_model_upload is want


def test_lists_and_paths_from_the_environment(tmp_path: Path) -> None:
    env = {
        "KERNELPORT_MODEL_REPOSITORY": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}",
        "KERNELPORT_MODEL_CONTROL_MODE": "explicit",
        "KERNELPORT_LOAD_MODEL": " a, b,,",
        "KERNELPORT_TLS_CA": "",  # set but empty: no file
    }
    config = Config.load(None, environ=env)
    assert config.model_repository == (tmp_path / "a", tmp_path / "b")
    assert config.load_model == ("a", "b") and config.tls_ca is None


def test_keyword_construction_frozen_and_keys_hidden(tmp_path: Path) -> None:
    config = Config(model_repository=(tmp_path,), http_port=0, api_keys=("secret-key",))
    assert (config.model_repository, config.http_port, config.grpc_port) == ((tmp_path,), 0, 8001)
    assert "secret-key" not in repr(config) and "secret-key" not in str(config)
    with pytest.raises(ValueError):
        config.http_port = 1  # type: ignore[misc]
    assert config == Config(model_repository=(tmp_path,), http_port=0, api_keys=("secret-key",))
    assert hash(config) == hash(Config.from_mapping(config.model_dump()))
