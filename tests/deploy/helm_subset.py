"""Renders the kernelport Helm chart without helm: the subset of Go templates the chart uses.

Helm has no package in the registries these machines reach, so the chart's tests render it
here, then validate the documents against the Kubernetes schemas. The subset is deliberately
small and strict: ``if``/``else``/``end``, ``define``/``include``, field paths from ``.``, the
functions below, and pipelines. Anything else (a ``range``, an unknown function, a missing
value) raises, so a template the subset cannot render fails its test rather than passing
half-rendered; the chart stays within this subset (tests/deploy/test_helm.py says so).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


class TemplateError(ValueError):
    pass


@dataclass
class _Block:
    kind: str  # "root", "if", "define"
    arg: str = ""
    body: list[Any] = field(default_factory=list)
    orelse: list[Any] | None = None


def _indent(n: int, text: str) -> str:
    return "\n".join(" " * n + line for line in str(text).split("\n"))


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _or(*values: Any) -> Any:
    return next((v for v in values if v), values[-1])


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "printf": lambda fmt, *args: fmt.replace("%s", "{}").format(*args),
    "trunc": lambda n, s: s[:n],
    "trimSuffix": lambda suffix, s: s.removesuffix(suffix),
    "quote": lambda s: json.dumps(str(s)),
    "default": lambda fallback, value: value if value else fallback,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "toYaml": _to_yaml,
    "or": _or,
    "not": lambda value: not value,
}


def _parse(source: str) -> _Block:
    """The template as a tree of text, actions and blocks, whitespace trimmed as Go does."""
    root = _Block("root")
    stack = [root]
    pos = 0
    pieces: list[tuple[str, str]] = []
    for match in _ACTION.finditer(source):
        pieces.append(("text", source[pos : match.start()]))
        if match[1] and pieces[-1][0] == "text":
            pieces[-1] = ("text", pieces[-1][1].rstrip())
        pieces.append(("action", match[2] + ("\0" if match[3] else "")))
        pos = match.end()
    pieces.append(("text", source[pos:]))
    trim_next = False
    for kind, value in pieces:
        if kind == "text":
            stack[-1].body.append(value.lstrip() if trim_next else value)
            trim_next = False
            continue
        trim_next = value.endswith("\0")
        action = value.rstrip("\0")
        word, _, rest = action.partition(" ")
        if word in ("if", "define"):
            block = _Block(word, rest.strip())
            stack[-1].body.append(block)
            stack.append(block)
        elif word == "else":
            if stack[-1].kind != "if" or rest:
                raise TemplateError(f"unsupported: {{{{ {action} }}}}")
            stack[-1].orelse = []
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("an end with no block open")
            stack.pop()
        elif word in ("range", "with", "template", "block", "tpl", "lookup"):
            raise TemplateError(f"not in the subset: {{{{ {action} }}}}")
        else:
            target = stack[-1].orelse if stack[-1].orelse is not None else stack[-1].body
            target.append(("expr", action))
    if len(stack) != 1:
        raise TemplateError(f"unclosed {stack[-1].kind} block")
    return root


class Chart:
    """A chart directory: its Chart.yaml, values.yaml and templates, ready to render."""

    def __init__(self, path: Path) -> None:
        meta = yaml.safe_load((path / "Chart.yaml").read_text())
        self.chart = {"Name": meta["name"], "Version": meta["version"]}
        self.chart["AppVersion"] = meta["appVersion"]
        self.values: dict[str, Any] = yaml.safe_load((path / "values.yaml").read_text())
        self.defines: dict[str, list[Any]] = {}
        self.templates: dict[str, _Block] = {}
        for file in sorted((path / "templates").iterdir()):
            tree = _parse(file.read_text())
            self._collect_defines(tree)
            if not file.name.startswith("_"):
                self.templates[file.name] = tree

    def _collect_defines(self, block: _Block) -> None:
        for node in block.body:
            if isinstance(node, _Block) and node.kind == "define":
                self.defines[json.loads(node.arg)] = node.body

    def render(self, values: dict[str, Any] | None = None, release: str = "demo") -> list[Any]:
        """Every document the templates produce, parsed; ``values`` merged over values.yaml."""
        context = {
            "Values": _merge(self.values, values or {}),
            "Release": {"Name": release, "Namespace": "default"},
            "Chart": self.chart,
        }
        docs = []
        for tree in self.templates.values():
            text = self._render(tree.body, context)
            docs += [d for d in yaml.safe_load_all(text) if d is not None]
        return docs

    def _render(self, nodes: list[Any], context: Any) -> str:
        out = []
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _Block) and node.kind == "if":
                branch = node.body if self._eval(node.arg, context) else node.orelse or []
                out.append(self._render(branch, context))
            elif isinstance(node, tuple):
                out.append(_text(self._eval(node[1], context)))
        return "".join(out)

    def _eval(self, expr: str, context: Any) -> Any:
        value: Any = _NOTHING
        for command in expr.split("|"):
            words = shlex.split(command, posix=False)
            if words[0] == "include":
                args = [self._term(w, context) for w in words[1:]]
                result: Any = self._render(self.defines[args[0]], args[1])
            elif words[0] in _FUNCTIONS:
                args = [self._term(w, context) for w in words[1:]]
                result = _FUNCTIONS[words[0]](*args, *([] if value is _NOTHING else [value]))
            elif len(words) == 1 and value is _NOTHING:
                result = self._term(words[0], context)
            else:
                raise TemplateError(f"not in the subset: {command.strip()!r}")
            value = result
        return value

    @staticmethod
    def _term(word: str, context: Any) -> Any:
        if word.startswith('"'):
            return json.loads(word)
        if word.isdigit():
            return int(word)
        if word == ".":
            return context
        if not word.startswith("."):
            raise TemplateError(f"not in the subset: {word!r}")
        value = context
        for key in word[1:].split("."):
            if not isinstance(value, dict) or key not in value:
                raise TemplateError(f"no value at {word}")
            value = value[key]
        return value


_NOTHING = object()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise TemplateError("a template printed a null value")
    return str(value)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both else value
    return merged
