"""Where the deploy files are, and which flags the real CLI accepts, for tests/deploy."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_FLAG = re.compile(r"(--[a-z][a-z0-9-]*)")


@functools.cache
def cli_flags(command: str) -> frozenset[str]:
    """The long options ``kernelport COMMAND --help`` lists."""
    out = subprocess.run(
        [sys.executable, "-m", "kernelport", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return frozenset(_FLAG.findall(out))


def flag_names(args: list[str]) -> list[str]:
    """The ``--flag`` names in an argument list (``--a=1`` and ``--a 1`` alike)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]
