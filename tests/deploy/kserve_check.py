"""Run inside a venv that has the ``kserve`` package (``make kserve``): read a ServingRuntime
from YAML into KServe's own generated models, failing on any field KServe does not define and
on any field it requires that is missing. Prints "ok" or the problem, and exits 0 or 1.

    .venv-kserve/bin/python tests/deploy/kserve_check.py deploy/kserve/servingruntime.yaml
"""

from __future__ import annotations

import re
import sys
from typing import Any

import kserve.models
import kubernetes.client
import yaml

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def model_class(name: str) -> Any:
    for module in (kserve.models, kubernetes.client):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no generated model named {name}")


def build(value: Any, type_name: str, where: str) -> Any:
    """``value`` as an instance of the generated type ``type_name``, checked strictly."""
    if (item := re.fullmatch(r"[lL]ist\[(.+)\]", type_name)) is not None:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        return [build(v, item.group(1), f"{where}[{i}]") for i, v in enumerate(value)]
    if (item := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)) is not None:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
        inner = item.group(1) or item.group(2)
        return {k: build(v, inner, f"{where}.{k}") for k, v in value.items()}
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]):
            raise TypeError(f"{where}: expected {type_name}, got {type(value).__name__}")
        return value
    cls = model_class(type_name)
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected a {type_name} mapping, got {type(value).__name__}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_key))
    if unknown:
        raise KeyError(f"{where}: {type_name} has no field(s) {unknown}")
    fields = {
        by_key[k]: build(v, cls.openapi_types[by_key[k]], f"{where}.{k}") for k, v in value.items()
    }
    return cls(**fields)  # the generated constructor refuses a missing required field


def main(path: str) -> int:
    with open(path) as f:
        document = yaml.safe_load(f)
    try:
        build(document, "V1alpha1ServingRuntime", "ServingRuntime")
    except (TypeError, KeyError, ValueError, LookupError) as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
