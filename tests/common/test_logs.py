"""The one log format of both programs: JSON lines with context as top-level fields, text on
a terminal, libraries' own loggers (aiohttp's server errors) through the same formatter, and
the libraries whose debug output carries credentials held at INFO."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from common import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    names = (*logs.NEVER_DEBUG, *logs.QUIET)
    saved = (root.handlers[:], root.level, {name: logging.getLogger(name).level for name in names})
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


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
    access = logging.getLogger("aiohttp.access")
    assert not access.isEnabledFor(logging.INFO)  # probes are not logged


def test_json_line_has_the_core_keys_then_the_context(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", stream=out)  # a StringIO is not a terminal: JSON
    log = logging.getLogger("webhook")
    log.info("admission mutated", extra={"uid": "u-1", "mode": "cache", "pod": None})
    log.warning("spoofed", extra={"level": "debug", "logger": "other", "ts": "then"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("crashed", extra={"key": "abc"})
    first, spoofed, crashed = lines(out)
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2025-01-01T00:00:00.000Z")
    assert (first["level"], first["logger"], first["msg"]) == ("info", "webhook",
                                                                 "admission mutated")
    assert (first["uid"], first["mode"], first["pod"]) == ("u-1", "cache", None)
    assert "fields" not in first
    # a field never replaces one of the core keys
    assert (spoofed["level"], spoofed["logger"]) == ("warning", "webhook")
    assert spoofed["ts"] != "then"
    assert crashed["key"] == "abc" and "ValueError: boom" in crashed["exception"]


def test_json_escapes_what_is_not_ascii(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", stream=out)
    logging.getLogger("agent").info("name", extra={"file": "mod\u00e8le\u009b[2J\u2028.bin"})
    raw = out.getvalue()
    assert raw.isascii() and len(raw.splitlines()) == 1
    assert lines(out)[0]["file"] == "mod\u00e8le\u009b[2J\u2028.bin"


def test_text_on_a_terminal(restore_logging: None) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    logs.setup("info", stream=out)
    logging.getLogger("agent").info("model ready", extra={"key": "k1", "error": None})
    line = out.getvalue().rstrip("\n")
    assert line.split(None, 1)[1] == "info    model ready  key=k1"


async def test_aiohttp_server_errors_come_out_as_json(restore_logging: None) -> None:
    """aiohttp's own loggers (aiohttp.server, aiohttp.web) go through the same formatter."""
    out = io.StringIO()
    logs.setup("info", stream=out)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    app = web.Application()
    app.router.add_get("/", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 500
    finally:
        await runner.cleanup()
    errors = [e for e in lines(out) if str(e["logger"]).startswith("aiohttp")]
    assert errors and errors[0]["level"] == "error"
    assert "RuntimeError: handler bug" in str(errors[0]["exception"])
