"""A client of an agent's admin API, used by the CLI and the init container."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp

from common.errors import ModelcacheError

DEFAULT_AGENT = "http://127.0.0.1:9400"


class AgentError(ModelcacheError):
    """The agent answered with an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def unreachable(self) -> bool:
        return self.status == 0


class AgentClient:
    def __init__(self, base_url: str = DEFAULT_AGENT, token: str | None = None,
                 timeout: float = 30.0, reply_timeout: float = 60.0) -> None:
        """``timeout``: seconds to connect; ``reply_timeout``: seconds a connected agent may
        stay silent (on top of a ``wait`` the request asks for)."""
        self.base = base_url.rstrip("/")
        self.reply_timeout = reply_timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                              sock_read=None)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, *, json: Any = None,
                    params: dict[str, str] | None = None, read_timeout: float | None = None
                    ) -> Any:
        assert self._session is not None, "use 'async with AgentClient(...)'"
        try:
            async with self._session.request(
                method, self.base + path, json=json, params=params,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.sock_connect,
                                              sock_read=read_timeout or self.reply_timeout),
            ) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    message = body.get("error") if isinstance(body, dict) else None
                    raise AgentError(resp.status, message or f"HTTP {resp.status}")
                return body
        except (TimeoutError, aiohttp.ClientConnectionError, OSError) as e:
            raise AgentError(0, f"cannot reach the agent at {self.base}: "
                                f"{str(e) or type(e).__name__}") from e

    async def ensure(self, uri: str, include: list[str] | None = None, pin: bool = False,
                     credentials: str | None = None, verify: str | None = None,
                     warm: bool = False) -> dict[str, Any]:
        """``warm``: a pod is about to load the model (the agent reads it into the page
        cache once it is ready)."""
        body: dict[str, Any] = {"uri": uri}
        if warm:
            body["warm"] = True
        if verify:
            body["verify"] = verify
        if include:
            body["include"] = include
        if pin:
            body["pin"] = True
        if credentials:
            body["credentials"] = credentials
        result: dict[str, Any] = await self._call("POST", "/api/v1/models", json=body)
        return result

    async def model(self, key: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": str(wait)} if wait is not None else None
        result: dict[str, Any] = await self._call(
            "GET", f"/api/v1/models/{key}", params=params,
            read_timeout=(wait or 0) + self.reply_timeout)
        return result

    async def models(self) -> list[dict[str, Any]]:
        result = await self._call("GET", "/api/v1/models")
        return list(result["models"])

    async def remove(self, key: str, force: bool = False) -> dict[str, Any]:
        params = {"force": "true"} if force else None
        result: dict[str, Any] = await self._call("DELETE", f"/api/v1/models/{key}",
                                                  params=params)
        return result

    async def report_fallback(self, key: str) -> None:
        await self._call("POST", f"/api/v1/models/{key}/fallback")

    async def gc(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/api/v1/gc", read_timeout=600)
        return result

    async def store(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/api/v1/store")
        return result

    async def metrics(self) -> str:
        assert self._session is not None
        async with self._session.get(self.base + "/metrics") as resp:
            return await resp.text()

    async def follow(self, key: str, on_update: Callable[[dict[str, Any]], None],
                     interval: float = 0.5, limit: float | None = None) -> dict[str, Any]:
        """Poll a model until it is ready or failed, reporting each state."""
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            model = await self.model(key)
            on_update(model)
            if model["state"] in ("ready", "failed"):
                return model
            if deadline is not None and loop.time() >= deadline:
                return model
            await self.model(key, wait=interval)
