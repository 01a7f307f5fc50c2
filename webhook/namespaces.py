"""Namespace labels, kept current by a watch, handed to the pure planner as data.

The planner chooses the default mode from a namespace's ``pod-security.kubernetes.io/
enforce`` label. :class:`NamespaceCache` holds every namespace's labels; :class:`NamespaceWatch`
keeps it current the way an informer does: list, then watch from the list's
resourceVersion with bookmarks; a 410 Gone (as an HTTP status or an ERROR event) means the
version is too old, so list again; any other failure reconnects from the last version seen,
after an exponential backoff with jitter. Until the first list succeeds (or with no
cluster access at all) every namespace's labels are unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp

from common.backoff import Backoff

from .cluster import ClusterError, Gone, KubeApi

PATH = "/api/v1/namespaces"
LIST_PAGE = 500


class NamespaceCache:
    """Labels by namespace name; None for a namespace not (yet) known."""

    def __init__(self) -> None:
        self._labels: dict[str, Mapping[str, str]] = {}
        self.synced = False
        self._changed = asyncio.Event()

    def labels(self, namespace: str) -> Mapping[str, str] | None:
        if not self.synced:
            return None
        return self._labels.get(namespace)

    def replace(self, items: Mapping[str, Mapping[str, str]]) -> None:
        self._labels = {name: MappingProxyType(dict(labels)) for name, labels in items.items()}
        self.synced = True
        self._notify()

    def put(self, namespace: str, labels: Mapping[str, str]) -> None:
        self._labels[namespace] = MappingProxyType(dict(labels))
        self._notify()

    def remove(self, namespace: str) -> None:
        self._labels.pop(namespace, None)
        self._notify()

    def __len__(self) -> int:
        return len(self._labels)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[NamespaceCache], bool]) -> None:
        """Return once ``predicate(self)`` holds (checked after every change)."""
        while not predicate(self):
            await self._changed.wait()


class NamespaceWatch:
    """Keeps a :class:`NamespaceCache` current from the API server."""

    def __init__(
        self, api: KubeApi, cache: NamespaceCache, log: logging.Logger,
        backoff: Backoff | None = None, watch_seconds: int = 300, page_size: int = LIST_PAGE,
    ) -> None:
        self.api = api
        self.cache = cache
        self.log = log
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.watch_seconds = watch_seconds
        self.page_size = page_size
        self.resource_version: str | None = None
        self.lists = 0
        self.failures = 0
        self._failing = False
        self._progress = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                self.backoff.reset()
            except Gone:
                self.log.info("namespace watch: resourceVersion too old, listing again")
                self.resource_version = None
                self._notify()
            except (TimeoutError, ClusterError, aiohttp.ClientError, OSError) as e:
                self._report(e)
                self._notify()
                await asyncio.sleep(self.backoff.next())

    async def _list(self) -> None:
        items: dict[str, Mapping[str, str]] = {}
        params = {"limit": str(self.page_size)}
        while True:
            page = await self.api.request("GET", PATH, params=params)
            for item in page.get("items") or []:
                name, labels = _name_labels(item)
                if name:
                    items[name] = labels
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {"limit": str(self.page_size), "continue": str(meta["continue"])}
        self.cache.replace(items)
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.lists += 1
        if self._failing or self.lists == 1:
            self.log.info("namespace labels synced", extra={"namespaces": len(items)})
        self._failing = False
        self._notify()

    async def _watch(self) -> None:
        params = {
            "resourceVersion": self.resource_version or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds),
        }
        async for event in self.api.watch(PATH, params, idle_seconds=self.watch_seconds + 60):
            kind = event.get("type")
            obj = event.get("object") or {}
            version = (obj.get("metadata") or {}).get("resourceVersion")
            name, labels = _name_labels(obj)
            if kind in ("ADDED", "MODIFIED") and name:
                self.cache.put(name, labels)
            elif kind == "DELETED" and name:
                self.cache.remove(name)
            if version:
                self.resource_version = str(version)
            if self._failing:
                self._failing = False
                self.log.info("namespace watch recovered")
            self._notify()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_for(self, predicate: Callable[[NamespaceWatch], bool]) -> None:
        """Return once ``predicate(self)`` holds (checked after every list, event, error)."""
        while not predicate(self):
            await self._progress.wait()

    def _report(self, error: Exception) -> None:
        self.failures += 1
        if not self._failing:  # say it once per outage, not on every retry
            self.log.warning(
                "namespace watch failing; labels may be stale or unknown",
                extra={"error": str(error)[:300]},
            )
        self._failing = True


def _name_labels(item: Any) -> tuple[str, Mapping[str, str]]:
    meta = item.get("metadata") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return "", {}
    labels = meta.get("labels") or {}
    clean = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return str(meta.get("name") or ""), clean
