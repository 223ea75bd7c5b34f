"""Model names, versions and upload file keys as they arrive from the wire: checked here, once.

A model name becomes a directory name (repository lookups, staged uploads), so anything that
could step out of a directory, hide in one, or not be a file name at all is refused before any
code uses it. Messages echo at most :data:`ECHO_CHARS` characters of what was sent, so an
error about a huge name stays small (gRPC carries the message in a size-limited header).
"""

from __future__ import annotations

from kernelport.errors import invalid, not_found

MAX_NAME_BYTES = 255  # a file name's limit on common file systems
ECHO_CHARS = 64
INT64_MAX = 2**63 - 1
_ASCII_DIGITS = frozenset("0123456789")


def shown(text: str) -> str:
    """``text`` as quoted in a message: at most ECHO_CHARS characters, control characters
    escaped (a name may be the reason it is being refused)."""
    cut = text[:ECHO_CHARS]
    escaped = cut.encode("unicode_escape", "backslashreplace").decode("ascii")
    if not cut.isprintable():
        cut = escaped
    return cut + ("..." if len(text) > ECHO_CHARS else "")


def _form_problem(name: str) -> str | None:
    # Everything but the length: what makes a name malformed rather than merely unknown.
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative directory name"
    if name.startswith("."):
        return "starts with '.' (hidden names are not models)"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if not name.isprintable():  # NUL, control, format and separator characters, surrogates
        return "contains a control or non-printable character"
    return None


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model name, or None when it can."""
    problem = _form_problem(name)
    if problem is None and len(name) * 4 > MAX_NAME_BYTES:  # cheap test before encoding
        size = len(name.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            problem = f"is {size} bytes long (at most {MAX_NAME_BYTES} bytes in UTF-8)"
    return problem


def is_model_name(name: str) -> bool:
    return name_problem(name) is None


def check_model_name(name: str) -> str:
    """``name`` when it is a valid model name; INVALID_ARGUMENT naming the problem if not."""
    problem = name_problem(name)
    if problem is not None:
        raise invalid(f"model name '{shown(name)}' {problem}")
    return name


def check_lookup_name(name: str) -> str:
    """A name used to look a model up: malformed is INVALID_ARGUMENT, but well formed and
    merely too long to exist is NOT_FOUND (no model can have it), in a short message."""
    if _form_problem(name) is None and name_problem(name) is not None:
        raise not_found(
            f"model '{shown(name)}' is not found (model names are at most {MAX_NAME_BYTES} bytes)"
        )
    return check_model_name(name)


def parse_version(text: str, field: str = "model version") -> int | None:
    """A requested version: None for "" (the default version), else the int of its ASCII
    digits. Other digits (Arabic-Indic, superscripts) and values past int64 are INVALID_ARGUMENT."""
    if not text:
        return None
    if not set(text) <= _ASCII_DIGITS or len(text) > 19 or int(text) > INT64_MAX:
        raise invalid(
            f"{field} '{shown(text)}' is not a version number (expected ASCII digits, "
            f"at most {INT64_MAX})"
        )
    return int(text)


def upload_path(key: str) -> tuple[str, ...]:
    """The path segments of a load request's ``file:<version>/<path>`` key.

    Only one spelling of each path is accepted (no '.', '..' or empty segments, no
    backslashes), so two keys can never name the same file.
    """
    relative = key.removeprefix("file:")
    parts = tuple(relative.split("/"))
    problem = None
    if not relative:
        problem = "the path is empty"
    elif relative.startswith("/"):
        problem = "the path is absolute"
    elif "\\" in relative:
        problem = "backslashes are not path separators here"
    elif not relative.isprintable():
        problem = "the path holds a control or non-printable character"
    elif any(p in ("", ".", "..") for p in parts):
        problem = "empty, '.' and '..' path segments are not allowed"
    elif any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts):
        problem = f"a path segment is over {MAX_NAME_BYTES} bytes"
    if problem is not None:
        raise invalid(
            f"load parameter '{shown(key)}': {problem} (expected 'file:<version>/<path>' "
            "relative to the model directory)"
        )
    return parts


def upload_paths(keys: list[str]) -> dict[str, tuple[str, ...]]:
    """Every key's segments; INVALID_ARGUMENT when one key's file is another's directory."""
    paths = {key: upload_path(key) for key in keys}
    files = {parts: key for key, parts in paths.items()}
    for key, parts in paths.items():
        for depth in range(1, len(parts)):
            other = files.get(parts[:depth])
            if other is not None:
                raise invalid(
                    f"load parameters '{shown(other)}' and '{shown(key)}': the first is a file "
                    "and the second needs it to be a directory"
                )
    return paths
