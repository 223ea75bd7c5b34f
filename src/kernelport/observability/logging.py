"""Logging setup (called once by the server, never on import) and Triton's log settings."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from kernelport.errors import ErrorCode, ServerError, invalid

# Attributes a log call may pass with ``extra=`` that the JSON format writes as fields.
FIELDS = ("request_id", "model", "version", "protocol", "code")
_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _formatter(fmt: str, iso8601: bool = False) -> logging.Formatter:
    if fmt == "json":
        return _JsonFormatter()
    return logging.Formatter(_PLAIN, "%Y-%m-%dT%H:%M:%S" if iso8601 else None)


def configure(level: str, fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _set_level(logging.getLevelName(level.upper()))
    # uvicorn's per-request access log costs throughput and duplicates our own logs.
    logging.getLogger("uvicorn.access").disabled = True
    return handler


def _set_level(level: int) -> None:
    logging.getLogger().setLevel(level)
    # uvicorn's startup banner names ports our own startup line already reports.
    logging.getLogger("uvicorn.error").setLevel(max(level, logging.WARNING))


class LogSettings:
    """Triton's ``v2/logging`` settings, mapped onto Python's root logger.

    Python filters by one threshold, so the enabled flags become the lowest enabled level:
    ``log_verbose_level`` > 0 is DEBUG, else ``log_info`` INFO, else ``log_warning`` WARNING,
    else ``log_error`` ERROR, else only CRITICAL. ``log_format`` "ISO8601" switches plain
    timestamps to ISO 8601; the plain/JSON choice stays the server's ``--log-format``.
    Logs go to stderr: ``log_file`` can only be "".
    """

    def __init__(self, level: str = "info", fmt: str = "plain") -> None:
        self._fmt = fmt
        self._handler: logging.Handler | None = None
        number = logging.getLevelName(level.upper())
        self._values: dict[str, Any] = {
            "log_file": "",
            "log_info": number <= logging.INFO,
            "log_warning": number <= logging.WARNING,
            "log_error": number <= logging.ERROR,
            "log_verbose_level": 1 if number <= logging.DEBUG else 0,
            "log_format": "default",
        }

    def attach(self, handler: logging.Handler) -> None:
        """Manage the handler ``configure`` installed (until then, settings are only stored)."""
        self._handler = handler

    def get(self) -> dict[str, Any]:
        return dict(self._values)

    def update(self, values: dict[str, Any]) -> dict[str, Any]:
        new = dict(self._values)
        for key, value in values.items():
            if key not in new:
                raise invalid(f"unknown log setting '{key}' (known: {', '.join(new)})")
            if value is None:
                continue
            if key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise invalid(f"log setting '{key}' must be a boolean, got {value!r}")
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise invalid(f"log_verbose_level must be an integer >= 0, got {value!r}")
            elif key == "log_format":
                if value not in ("default", "ISO8601"):
                    raise invalid(f"log_format must be 'default' or 'ISO8601', got {value!r}")
            elif value != "":
                raise ServerError(ErrorCode.UNSUPPORTED, "logs go to stderr; log_file must be ''")
            new[key] = value
        self._values = new
        if self._handler is not None:
            _set_level(self.level())
            self._handler.setFormatter(_formatter(self._fmt, new["log_format"] == "ISO8601"))
        return self.get()

    def level(self) -> int:
        v = self._values
        if v["log_verbose_level"] > 0:
            return logging.DEBUG
        for key, level in (("log_info", logging.INFO), ("log_warning", logging.WARNING),
                           ("log_error", logging.ERROR)):  # fmt: skip
            if v[key]:
                return level
        return logging.CRITICAL
