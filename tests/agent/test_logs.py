"""Log set-up: libraries whose debug output carries credentials stay at INFO or above."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from agent import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level,
             {name: logging.getLogger(name).level for name in logs.NEVER_DEBUG})
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
def test_credential_carrying_libraries_never_log_debug(level: str,
                                                       restore_logging: None) -> None:
    logs.setup(level, json_logs=True)
    threshold = max(logging.getLevelName(level.upper()), logging.INFO)
    assert logging.getLogger("agent.fetch.engine").isEnabledFor(logging.getLevelName(level.upper()))
    for name in ("botocore.auth", "botocore.endpoint", "kubernetes_asyncio.client.rest",
                 "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.DEBUG), name
        assert logger.isEnabledFor(threshold) and not logger.isEnabledFor(threshold - 1), name
