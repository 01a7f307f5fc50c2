"""Informers: a list-then-watch view of one kind of object that loses no change.

The list/watch/410-relist loop of both programs (the agent's CachedModels, pods and Node,
the webhook's namespaces). Objects are plain JSON ``dict``s as the apiserver sends them. The
requests go through a :class:`Transport` (``common.kube.client.KubeClient``), which turns
every refusal into the project's errors (``common.kube.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from common.backoff import Backoff
from common.errors import ModelcacheError, TransientError
from common.kube.errors import Expired, api_error, describe
from common.kube.settings import KubeSettings

log = logging.getLogger(__name__)

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Call = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: Obj
    #: derived from a list (first sync or relist after 410) rather than a watch event
    synthetic: bool = False


class Transport(Protocol):
    """What an informer needs of the client: its settings and its two ways of calling."""

    settings: KubeSettings

    async def call_json(self, what: str, call: Call, *args: Any, **kwargs: Any) -> Obj: ...

    async def open(self, what: str, call: Call, *args: Any,
                   **kwargs: Any) -> aiohttp.ClientResponse: ...


def object_key(obj: Obj) -> str:
    """``namespace/name`` (or ``name`` for a cluster-scoped object): the key of a store."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


class Informer:
    """A list-then-watch view of one kind of object that loses no change.

    Iterate ``events()`` (or ``run(handler)``) to drive it: it lists, reports every object as
    ADDED, then watches from the list's resourceVersion. Lists are served by the apiserver's
    watch cache, not etcd, as client-go's reflector asks for them: the first with
    ``resourceVersion=0`` (any version; the cache ignores ``limit`` and answers whole), a
    relist with the last resourceVersion seen (not older than what this informer already
    reported) and no ``limit``; only a relist refused with 410 is a consistent read from
    etcd (``resourceVersion`` unset, in pages). A stream that ends or breaks is
    resumed from the last resourceVersion seen (events and bookmarks move it); one refused
    with ``410 Expired`` (an ERROR event or an HTTP status) is replaced by a new list whose
    difference from ``store`` is reported (ADDED, MODIFIED, and DELETED for objects that
    vanished meanwhile, with their last known state). ``store`` always holds the objects as
    of the last event yielded. Failures are retried forever with the shared backoff (after
    the apiserver's ``Retry-After``); an outage is logged once, at WARNING, and its end once.
    """

    def __init__(
        self,
        client: Transport,
        resource: str,
        lister: Call,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> None:
        self._client = client
        self.resource = resource
        self._lister = lister
        self._selectors = {k: v for k, v in (("field_selector", field_selector),
                                             ("label_selector", label_selector)) if v}
        self.store: dict[str, Obj] = {}
        self.resource_version = ""
        #: set once the first list has been reported (every event of it handled)
        self.synced = asyncio.Event()
        #: lists done (the first one, then one per 410 or failed list)
        self.lists = 0
        #: watch requests made
        self.watches = 0
        #: failed lists and watches, in all
        self.failures = 0
        self.last_error: ModelcacheError | None = None
        self._failing = False
        self._progress = asyncio.Event()
        #: the next list must be a consistent read (the cache refused the last one with 410)
        self._consistent = False

    def get(self, name: str, namespace: str = "") -> Obj | None:
        return self.store.get(f"{namespace}/{name}" if namespace else name)

    async def run(self, handler: Callable[[WatchEvent], Awaitable[None]]) -> None:
        """Call ``handler`` for each event, until cancelled."""
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                await handler(event)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is checked after every list, every event the
        consumer has handled, every bookmark and every failure (no polling). Use with
        ``asyncio.timeout``."""
        while not predicate():
            await self._progress.wait()

    async def events(self) -> AsyncGenerator[WatchEvent, None]:
        """Every change, forever (use with ``contextlib.aclosing``)."""
        settings = self._client.settings
        backoff = Backoff(settings.backoff_base, settings.backoff_max)
        must_list = True
        loop = asyncio.get_running_loop()
        while True:
            try:
                if must_list:
                    for event in await self._list():
                        self._apply(event)
                        yield event
                        self._notify()
                    must_list = False
                    self.synced.set()
                    self._notify()
                started, seen = loop.time(), 0
                async with contextlib.aclosing(self._watch()) as stream:
                    async for event in stream:
                        seen += 1
                        backoff.reset()
                        self._apply(event)
                        yield event
                        self._notify()
                if not seen and loop.time() - started < 1.0:
                    await backoff.wait()  # a watch that ends at once: do not spin
            except Expired as e:
                log.info("informer expired; listing again", extra={
                    "resource": self.resource, "error": str(e)})
                self._consistent = must_list  # the list itself expired: ask etcd
                must_list = True
            except ModelcacheError as e:
                self._failed(e)
                await backoff.wait(e)

    async def _list(self) -> list[WatchEvent]:
        """List all pages at one resourceVersion; the difference from ``store`` as events."""
        settings = self._client.settings
        self.lists += 1
        items: dict[str, Obj] = {}
        token: str | None = None
        first: Obj = dict(self._selectors)
        if self._consistent:
            first["limit"] = settings.list_page_size
        elif self.resource_version:
            first["resource_version"] = self.resource_version
        else:
            first.update(resource_version="0", limit=settings.list_page_size)
        while True:
            page_args: Obj = dict(first)
            if token:  # a continued list names no resourceVersion (the token holds it)
                page_args.pop("resource_version", None)
                page_args["_continue"] = token
            page = await self._client.call_json(f"list {self.resource}", self._lister,
                                                **page_args)
            kind = str(page.get("kind", "")).removesuffix("List")
            for item in page.get("items") or []:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", page.get("apiVersion", ""))
                items[object_key(item)] = item
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        events = []
        for key, obj in items.items():
            old = self.store.get(key)
            if old is None:
                events.append(WatchEvent("ADDED", obj, synthetic=True))
            elif _rv(old) != _rv(obj):
                events.append(WatchEvent("MODIFIED", obj, synthetic=True))
        for key in self.store.keys() - items.keys():
            events.append(WatchEvent("DELETED", self.store[key], synthetic=True))
        self.resource_version = str(meta.get("resourceVersion", ""))
        self._consistent = False
        self._recovered()
        log.info("informer listed", extra={"resource": self.resource, "objects": len(items),
                                           "changes": len(events)})
        return events

    async def _watch(self) -> AsyncGenerator[WatchEvent, None]:
        settings = self._client.settings
        seconds = int(settings.watch_timeout * random.uniform(1.0, 2.0)) or 1
        self.watches += 1
        what = f"watch {self.resource}"
        resp = await self._client.open(
            what, self._lister, watch=True, allow_watch_bookmarks=True,
            resource_version=self.resource_version, timeout_seconds=seconds,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=settings.request_timeout, sock_read=seconds + 30
            ),
            **self._selectors,
        )
        self._recovered()
        finished = False
        try:
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    raise TransientError(f"{what}: stream broken: {describe(e)}") from e
                if not line:
                    finished = True
                    return
                event = _decode_event(what, line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    raise api_error(what, int(obj.get("code") or 500), line)
                if kind == "BOOKMARK":
                    self.resource_version = _rv(obj) or self.resource_version
                    self._notify()
                    continue
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    raise TransientError(f"{what}: unknown event type {kind!r}")
                self.resource_version = _rv(obj) or self.resource_version
                yield WatchEvent(kind, obj)
        finally:
            if finished:
                resp.release()
            else:
                resp.close()

    def _apply(self, event: WatchEvent) -> None:
        key = object_key(event.object)
        if event.type == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = event.object

    def _failed(self, error: ModelcacheError) -> None:
        self.failures += 1
        self.last_error = error
        if not self._failing:  # once per outage, not on every retry
            log.warning("informer failing; retrying", extra={
                "resource": self.resource, "error": str(error)[:300]})
        else:
            log.debug("informer still failing", extra={
                "resource": self.resource, "error": str(error)[:300]})
        self._failing = True
        self._notify()

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("informer recovered", extra={"resource": self.resource,
                                                  "failures": self.failures})

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


def _decode_event(what: str, line: bytes) -> Obj:
    try:
        event = json.loads(line)
    except ValueError as e:
        raise TransientError(f"{what}: a watch event is not JSON") from e
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise TransientError(f"{what}: a watch event has no object")
    return event


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
