"""Control-plane HTTP for sources: listings, manifests, tokens, registry lookups.

Small bodies read whole (capped), every hop checked by the egress policy, and 429 / 5xx /
resets retried with the shared backoff (``common/backoff.py``: full jitter after the wait the
server asked for in ``Retry-After`` or a ``RateLimit`` window; many nodes asking a hub at once
must spread out, not stampede, and come back when the hub said, not before).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from agent.egress import Egress, server_says, shown_url, status_error
from common import backoff
from common.errors import SourceError, TransientError

log = logging.getLogger(__name__)
MAX_BODY = 32 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise SourceError(f"{shown_url(self.url)} did not answer JSON: {e}") from e


class Control:
    def __init__(self, egress: Egress, retries: int = 6, backoff_base: float = 0.5,
                 backoff_max: float = 30.0) -> None:
        self.egress = egress
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The one policy-checked HTTP session of this client (made on first use)."""
        if self._session is None:
            self._session = self.egress.session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      ok: tuple[int, ...] = (200,), data: bytes | None = None,
                      max_body: int = MAX_BODY, read_body: bool = True) -> Reply:
        """Send a request, retrying transient failures; statuses not in ``ok`` raise.
        Without ``read_body`` only the status and headers are kept (a probe)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(method, url, headers, ok, data,
                                        max_body if read_body else -1)
            except TransientError as e:
                if attempt >= self.retries:
                    raise TransientError(f"{e} (after {attempt} attempts)") from e
                delay = backoff.delay(attempt, self.backoff_base, self.backoff_max,
                                      e.retry_after)
                log.log(retry_level(e), "retrying control request", extra={
                    "url": shown_url(url), "attempt": attempt, "delay": round(delay, 3),
                    "error": str(e)})
                await asyncio.sleep(delay)

    async def _once(self, method: str, url: str, headers: Mapping[str, str] | None,
                    ok: tuple[int, ...], data: bytes | None, max_body: int) -> Reply:
        resp = await self.egress.request(self.session(), method, url, headers=headers, data=data)
        async with resp:
            body = await _read_capped(resp, method, url, max_body) if max_body >= 0 else b""
            if resp.status not in ok:
                raise status_error(
                    resp.status, shown_url(url), resp.headers.get("Retry-After"),
                    resp.headers.get("RateLimit"),
                    server_says(resp.headers.get("X-Error-Message"), body, headers))
            return Reply(resp.status, resp.headers, body, str(resp.url))

    async def json(self, url: str, *, headers: Mapping[str, str] | None = None) -> Reply:
        return await self.request("GET", url, headers={"Accept": "application/json",
                                                       **(headers or {})})


async def _read_capped(resp: aiohttp.ClientResponse, method: str, url: str,
                       max_body: int) -> bytes:
    """The whole body (``read(n)`` returns what has arrived, not ``n`` bytes), refused
    once it grows past ``max_body``."""
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := await resp.content.read(64 * 1024):
            total += len(chunk)
            if total > max_body:
                raise SourceError(f"{shown_url(url)} answered more than {max_body} bytes")
            chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise TransientError(f"{method} {shown_url(url)}: {e}") from e
    return b"".join(chunks)


def retry_level(e: TransientError) -> int:
    """WARNING when the server asked us to wait (rate limited, or down for a while: an
    operator wants to see that), INFO for an ordinary retry."""
    return logging.WARNING if e.retry_after else logging.INFO
