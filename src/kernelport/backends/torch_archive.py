"""What kind of PyTorch file a model file is, and whether loading it could run pickled code.

All three formats the torch backend serves are zip archives:

* TorchScript (``torch.jit.save``): ``<root>/code/...`` and ``<root>/constants.pkl``;
* an exported program (``torch.export.save``): ``<root>/models/<name>.json`` plus weights;
* an AOTInductor package (``aoti_compile_and_package``): ``<root>/data/aotinductor/...``.

``torch.export.load`` unpickles some archive members with ``weights_only=False`` (weights of
tensor subclasses, "opaque" constants, and sample inputs that fail a weights-only load), so a
crafted ``.pt2`` could run arbitrary code at load. :func:`check_pickles` closes that door: every
pickled member must load under ``torch.load(weights_only=True)`` (which only rebuilds tensors
and plain containers) or the file is refused, unless the model opts in with ``allow_pickle``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Literal

import torch

from kernelport.errors import invalid

Format = Literal["torchscript", "exported", "aoti"]
FORMATS: tuple[Format, ...] = ("torchscript", "exported", "aoti")

# Members (below the archive's root folder) that torch.export.load reads as text or raw bytes.
_TEXT_OR_MARKERS = ("archive_format", "archive_version", "byteorder", "version", ".data/")
_AOTI_DIR = "data/aotinductor/"
_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_OPAQUE_PREFIX = "opaque_obj_"  # plain pickle.loads in torch.export.load
_CUSTOM_PREFIX = "custom_obj_"  # TorchScript's own unpickler: registered classes only


def _relative(member: str) -> str:
    """A member's path below the archive's single root folder."""
    return member.split("/", 1)[1] if "/" in member else member


def detect_format(path: Path, declared: str | None = None) -> Format:
    """The format of ``path``: ``declared`` when given, else recognised from the zip's members."""
    if declared:
        if declared not in FORMATS:
            raise invalid(f"parameter format '{declared}': expected one of {', '.join(FORMATS)}")
        return declared
    if not zipfile.is_zipfile(path):
        raise invalid(
            f"{path.name} is not a TorchScript or PT2 archive (not a zip file); save the model "
            "with torch.export.save, torch.jit.save or aoti_compile_and_package"
        )
    with zipfile.ZipFile(path) as archive:
        members = [_relative(m) for m in archive.namelist()]
    if any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "exported"
    if any(m.startswith(_AOTI_DIR) for m in members):
        return "aoti"
    if any(m.startswith("code/") for m in members) and "constants.pkl" in members:
        return "torchscript"
    if "data.pkl" in members:
        raise invalid(
            f"{path.name} looks like a torch.save pickle (a state_dict or a whole module): it is "
            "not loaded, because unpickling it can run arbitrary code; save the model with "
            "torch.export.save (or torch.jit.save) instead"
        )
    raise invalid(
        f"{path.name}: not a TorchScript archive, exported program or AOTInductor package; set "
        f"parameter format to one of {', '.join(FORMATS)} if it is one"
    )


def _weights_only(archive: zipfile.ZipFile, member: str, path: Path) -> None:
    try:
        torch.load(io.BytesIO(archive.read(member)), weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise invalid(
            f"{path.name}: member '{member}' holds pickled data that a weights-only load refuses "
            f"({reason[:200]}); set parameter allow_pickle: true only if you trust this file"
        ) from None


def check_pickles(path: Path) -> None:
    """Refuse a PT2 archive whose loading would unpickle anything beyond tensors and containers."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        raw_payloads: set[str] = set()
        pickled: list[str] = []
        for member in names:
            rel = _relative(member)
            if not (rel.startswith(_PAYLOAD_DIRS) and rel.endswith("config.json")):
                continue
            root = member[: len(member) - len(rel)]
            folder = root + rel.rsplit("/", 1)[0] + "/"
            entries = json.loads(archive.read(member)).get("config", {})
            for fqn, entry in entries.items():
                name = str(entry.get("path_name", ""))
                target = folder + name
                if name.startswith(_OPAQUE_PREFIX):
                    raise invalid(
                        f"{path.name}: constant '{fqn}' is a pickled Python object, which loading "
                        "would execute; set parameter allow_pickle: true only for a trusted file"
                    )
                if name.startswith(_CUSTOM_PREFIX) or not entry.get("use_pickle"):
                    raw_payloads.add(target)  # raw tensor bytes, or TorchScript custom objects
                else:
                    pickled.append(target)
        for member in names:
            rel = _relative(member)
            if (
                member.endswith("/")
                or member in raw_payloads
                or rel.endswith(".json")
                or rel.startswith((*_TEXT_OR_MARKERS, _AOTI_DIR, "extra/"))
            ):
                continue
            pickled.append(member)  # sample inputs, legacy weight files, anything unknown
        for member in dict.fromkeys(pickled):
            _weights_only(archive, member, path)
