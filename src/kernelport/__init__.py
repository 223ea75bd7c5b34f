"""KernelPort: a KServe V2 / Open Inference Protocol inference server.

Importing this package has no side effects and imports no web, RPC or ML framework:
``Server`` and ``Config`` are loaded on first use. ``kernelport serve`` is the command line.

    from kernelport import Config, Server

    server = Server(Config(model_repository=(Path("models"),), http_port=9000))
    await server.startup(); await server.serve(); await server.shutdown()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kernelport.version import __version__

__all__ = ["Config", "Server", "__version__"]

if TYPE_CHECKING:
    from kernelport.config import Config
    from kernelport.server import Server

_LAZY = {"Config": "kernelport.config", "Server": "kernelport.server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernelport' has no attribute {name!r}")
