"""Structured logs, one format for both programs: JSON lines in a cluster (stderr not a
terminal), readable lines on a terminal.

A JSON line is ``{"ts", "level", "logger", "msg", <fields>..., "exception"?}``: ``ts`` in UTC
with milliseconds, ``level`` in lower case, then the record's context as top-level fields.
Context goes in fields (``extra={"key": ..., "digest": ...}``), never in the message text; a
field never replaces one of the four above. Secrets never go anywhere near a log call.

:func:`setup` configures the root logger, so what libraries log (aiohttp's server errors,
asyncio's) comes out in the same format as our own lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

#: Libraries whose DEBUG output carries credentials: botocore logs each signed request's
#: headers (Authorization, X-Amz-Security-Token) and the signature of each presigned URL,
#: which is a bearer credential for an hour; kubernetes_asyncio logs every response body,
#: Secrets and TokenReviews included. They log at INFO and above whatever ``--log-level`` is.
NEVER_DEBUG = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes_asyncio")

#: Loggers kept at WARNING: aiohttp's access log would log every probe and scrape.
QUIET = ("aiohttp.access",)

CORE_KEYS = ("ts", "level", "logger", "msg")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in fields(record).items() if v is not None)
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} " \
               f"{record.levelname.lower():7} {record.getMessage()}"
        if context:
            line += f"  {context}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context a log call gave in ``extra``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def setup(level: str = "info", json_logs: bool | None = None,
          stream: IO[str] | None = None) -> None:
    """Configure the root logger once, at start-up: JSON unless ``stream`` (default stderr)
    is a terminal, or as ``json_logs`` says."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    use_json = not (hasattr(stream, "isatty") and stream.isatty()) if json_logs is None \
        else json_logs
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
    for name in NEVER_DEBUG:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
