"""Structured logs: JSON lines in a cluster (not a TTY), readable lines on a terminal.

Context goes in ``extra={"fields": {...}}``; values are the caller's responsibility: never
a token, a Secret's content or a URI with credentials in it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LOGGER = "modelcache.webhook"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        context = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        line += f"{record.levelname.lower():7} {record.getMessage()}"
        if context:
            line += f"  {context}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", stream: IO[str] | None = None) -> logging.Logger:
    """Configure the webhook's logger once, at start-up."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    tty = hasattr(stream, "isatty") and stream.isatty()
    handler.setFormatter(TextFormatter() if tty else JsonFormatter())
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # probes are not logged
    return log
