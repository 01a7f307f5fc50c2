"""Structured logs: JSON lines in a cluster (not a terminal), readable lines on a terminal.

Context goes in fields (``extra={"key": ..., "digest": ...}``), never in the message text;
secrets never go anywhere near a log call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Libraries whose DEBUG output carries credentials: botocore logs each signed request's
#: headers (Authorization, X-Amz-Security-Token) and the signature of each presigned URL,
#: which is a bearer credential for an hour; kubernetes_asyncio logs every response body,
#: Secrets and TokenReviews included. They log at INFO and above whatever ``--log-level`` is.
NEVER_DEBUG = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes_asyncio")

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
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} " \
               f"{record.levelname.lower():7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def setup(level: str = "info", json_logs: bool | None = None) -> None:
    """Configure the root logger once, at start-up."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in NEVER_DEBUG:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
