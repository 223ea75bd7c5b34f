"""The architecture's dependency rules, enforced.

``ALLOWED`` says which other areas of the package each area may import; every import
statement of every module counts (those inside functions and ``TYPE_CHECKING`` blocks too,
since they are dependencies all the same). On top of that the module graph has no cycles.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kernelport

PACKAGE = Path(kernelport.__file__).parent
ROOT = "kernelport"
# User model files shipped as data, loaded by path (their folders are not packages).
NOT_MODULES = {"demo_repository"}

# Area -> the areas it may import. An area is a top-level module or package of kernelport;
# ROOT is the package's own __init__ (the public facade). Leaf values come first.
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "types": frozenset({"errors"}),
    "limits": frozenset(),
    "version": frozenset(),
    # which request-path modules are compiled (mypyc): a list of names, imports nothing
    "native": frozenset(),
    "config": frozenset({"limits"}),
    "schema": frozenset(),
    "core": frozenset({"errors", "types", "limits"}),
    # pipeline: the partitioner and stage runtime, framework code but no server code
    "pipeline": frozenset(),
    "backends": frozenset({"core", "errors", "types", "pipeline"}),
    "pbtxt": frozenset({"core", "errors", "schema"}),
    "lifecycle": frozenset({"core", "errors"}),
    "observability": frozenset({"core", "errors", "types"}),
    "protocols": frozenset(
        {"core", "errors", "types", "limits", "config", "schema", "observability"}
    ),
    "server": frozenset(
        {
            "core",
            "errors",
            "types",
            "limits",
            "version",
            "config",
            "schema",
            "backends",
            "pbtxt",
            "lifecycle",
            "observability",
            "protocols",
            "native",
        }
    ),
    "hosting": frozenset({"config", "server", "protocols", "observability"}),
    "cluster": frozenset(
        {"config", "errors", "limits", "observability", "protocols", "schema", "version"}
    ),
    "worker": frozenset({"core", "errors", "types", "backends"}),
    "fetch": frozenset({"core"}),
    "benchmark": frozenset({"types", "backends"}),
    # kernelport tune: loads one model the way the manager would, outside a server
    "tune": frozenset({"core", "errors", "backends", "pbtxt"}),
    "cli": frozenset(
        {
            "config",
            "server",
            "version",
            "hosting",
            "observability",
            "cluster",
            "fetch",
            "benchmark",
            "pipeline",
            "tune",
        }
    ),
    "__main__": frozenset({"cli"}),
    ROOT: frozenset({"config", "server", "version"}),
}

WEB_AND_RPC = {"grpc", "uvicorn", "httptools", "starlette", "aiohttp", "prometheus_client"}
ML_FRAMEWORKS = {"onnxruntime", "torch", "tensorflow", "jax"}
# Third-party packages an area must not import: core stays I/O-free, and neither the schema
# (read by config loading) nor the backends see the wire.
FORBIDDEN_THIRD_PARTY = {
    "core": WEB_AND_RPC | ML_FRAMEWORKS | {"google"},
    "schema": WEB_AND_RPC,
    "backends": WEB_AND_RPC,
}
# Backends see the interface and configs, never the batching or the manager above them.
FORBIDDEN_MODULES = {
    "backends": {
        "kernelport.core.execution",
        "kernelport.core.manager",
        "kernelport.core.version_loader",
    }
}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    importer: str  # module name
    name: str  # as written, made absolute


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] not in NOT_MODULES
    }


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[Import]:
    """Every import in the file, wherever it sits; ``from pkg import sub`` names ``pkg.sub``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, module, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(path, node.lineno, module, sub if sub in MODULES else base)


def _is_ours(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _target(name: str) -> str | None:
    """The package module an imported name belongs to (longest known prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(PACKAGE.parent)}:{imp.line}: {imp.importer} imports {imp.name}"


def test_every_area_has_a_rule() -> None:
    areas = {_area(module) for module in MODULES}
    assert areas == set(ALLOWED), f"areas without a rule: {sorted(areas - set(ALLOWED))}"


def test_imports_follow_the_allowed_directions() -> None:
    problems = []
    for imp in ALL_IMPORTS:
        if not _is_ours(imp.name):
            continue
        target = _target(imp.name)
        if target is None:
            problems.append(f"{_where(imp)}: no such module in the package")
            continue
        src, dst = _area(imp.importer), _area(target)
        if src != dst and dst not in ALLOWED[src]:
            allowed = ", ".join(sorted(ALLOWED[src])) or "no other area"
            problems.append(f"{_where(imp)}: rule '{src}' may import {allowed}")
        if target in FORBIDDEN_MODULES.get(src, ()):
            problems.append(f"{_where(imp)}: rule '{src}' must not import {target}")
    assert not problems, "\n".join(problems)


def test_areas_import_no_forbidden_framework() -> None:
    problems = []
    for imp in ALL_IMPORTS:
        forbidden = FORBIDDEN_THIRD_PARTY.get(_area(imp.importer), set())
        if imp.name.split(".")[0] in forbidden:
            problems.append(f"{_where(imp)}: '{_area(imp.importer)}' imports no {imp.name}")
    assert not problems, "\n".join(problems)


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path per back edge found by a depth-first search, e.g. [a, b, a]."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Iterative DFS: a stack of (node, its remaining successors); on_path mirrors it.
        stack = [(start, iter(sorted(graph[start])))]
        on_path = [start]
        while stack:
            node, successors = stack[-1]
            nxt = next(successors, None)
            if nxt is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif nxt in on_path:
                cycles.append([*on_path[on_path.index(nxt) :], nxt])
            elif nxt not in done:
                stack.append((nxt, iter(sorted(graph[nxt]))))
                on_path.append(nxt)
    return cycles


def test_find_cycles_reports_the_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycles(graph) == [["a", "b", "c", "a"]]
    assert _find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in ALL_IMPORTS:
        target = _target(imp.name) if _is_ours(imp.name) else None
        if target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    cycles = _find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_themselves_form_no_cycle() -> None:
    # Otherwise a cycle between areas could grow one allowed import at a time.
    graph = {area: set(allowed) for area, allowed in ALLOWED.items()}
    assert _find_cycles(graph) == []


def test_import_has_no_side_effects() -> None:
    code = (
        "import logging, sys, kernelport, kernelport.cli, kernelport.config\n"
        "assert not logging.getLogger().handlers, 'logging configured on import'\n"
        "assert 'onnxruntime' not in sys.modules and 'grpc' not in sys.modules\n"
        "import kernelport.pbtxt\n"  # reading Triton configs needs protobuf, not gRPC
        "assert 'grpc' not in sys.modules, 'pbtxt pulls in gRPC'\n"
        "import tritonclient.grpc, kernelport.server\n"  # both proto users in one process
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_pinned() -> None:
    assert kernelport.__all__ == ["Config", "Server", "__version__"]
    from kernelport import Config, Server

    assert Server.__module__ == "kernelport.server" and Config.__module__ == "kernelport.config"
