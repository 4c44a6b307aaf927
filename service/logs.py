"""Structured logs: one JSON object per line (or plain text), configured the same in every worker.

The access line per request carries request id, method, route, status, latency, batch size
and provider; never image bytes or descriptions.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

# attributes every LogRecord has; anything else was passed with extra= and is logged as a field
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


class TextFormatter(logging.Formatter):
    """Plain lines, with control characters in the message escaped: whatever a client sends that
    reaches a log message (a path, a key name) cannot start a line of its own or move the cursor.
    A traceback, added after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging calls it by this name
        return super().formatMessage(record).translate(_CONTROL)


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A logging dictConfig for uvicorn's ``log_config``, so each worker process applies it."""
    formatter: dict[str, Any] = (
        {"()": "service.logs.JsonFormatter"} if fmt == "json"
        else {"()": "service.logs.TextFormatter", "format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.access": {"level": "WARNING"},  # our middleware writes the access line
        },
    }
