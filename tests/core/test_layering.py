"""The architecture's dependency rules, enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kernelport

PACKAGE = Path(kernelport.__file__).parent
FORBIDDEN_IN_CORE = {
    "grpc",
    "uvicorn",
    "httptools",
    "starlette",
    "aiohttp",
    "prometheus_client",
    "onnxruntime",
    "torch",
    "tensorflow",
    "jax",
    "google",
    "kernelport.protocols",
    "kernelport.server",
    "kernelport.observability",
    "kernelport.backends.onnxruntime",
    "kernelport.backends.registry",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_no_io_or_ml_framework() -> None:
    for path in (PACKAGE / "core").rglob("*.py"):
        for name in _imports(path):
            bad = [f for f in FORBIDDEN_IN_CORE if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.name} imports {name}"


def test_backends_do_not_see_wire_or_batching() -> None:
    for path in (PACKAGE / "backends").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("kernelport.protocols", "grpc", "uvicorn")), (path, name)
            assert name not in ("kernelport.core.execution", "kernelport.core.manager"), (
                path,
                name,
            )


def test_import_has_no_side_effects() -> None:
    code = (
        "import logging, sys, kernelport, kernelport.cli, kernelport.config\n"
        "assert not logging.getLogger().handlers, 'logging configured on import'\n"
        "assert 'onnxruntime' not in sys.modules and 'grpc' not in sys.modules\n"
        "import tritonclient.grpc, kernelport.server\n"  # both proto users in one process
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_pinned() -> None:
    assert kernelport.__all__ == ["Config", "Server", "__version__"]
    from kernelport import Config, Server

    assert Server.__module__ == "kernelport.server" and Config.__module__ == "kernelport.config"
