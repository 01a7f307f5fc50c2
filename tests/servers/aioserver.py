"""Run an aiohttp application on loopback, in its own thread or in the caller's loop.

:class:`AppThread` gives the app an event loop of its own in a daemon thread, so one server
works for sync tests, for async tests whatever their loop scope, and for agent processes
started by the test. :func:`serve` runs it in the current loop instead, for async tests
that want everything in one loop. Both bind 127.0.0.1 on a free port (port 0) and shut
the app down gracefully (cleanup contexts run, open connections are closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from tests.servers.net import LOOPBACK

T = TypeVar("T")

START_TIMEOUT = 10.0
SERVER_THREAD_NAMES = frozenset(
    {"aiohttp-test-server", "faulty-http", "hf-hub", "hf-cdn", "model-registry", "registry-token"}
)
"""Names of the threads the test servers run in (for leak checks)."""


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("site is not bound")


class AppThread:
    """An aiohttp app served from a background thread with its own event loop."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "aiohttp-test-server",
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        return f"{self.scheme}://{self.netloc}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:  # reported to the starting thread
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        # stop() ran the cleanup; drain what callbacks remain, then close
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = _bound_port(self._runner)

    def start(self) -> AppThread:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise TimeoutError("aiohttp test server did not start")
        if self._start_error is not None:
            self._thread.join()
            raise RuntimeError("aiohttp test server failed to start") from self._start_error
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run a plain callable on the server's loop (state shared with handlers)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self.run(self._runner.cleanup(), timeout=15.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15.0)
        if self._thread.is_alive():
            raise RuntimeError("aiohttp test server thread did not stop")

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def serve(
    app: web.Application,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serve ``app`` in the running loop; yields the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context is not None else "http"
        yield f"{scheme}://{host}:{_bound_port(runner)}"
    finally:
        await runner.cleanup()
