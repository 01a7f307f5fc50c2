"""Namespace labels, kept current by an informer, handed to the pure planner as data.

The planner chooses the default mode from a namespace's ``pod-security.kubernetes.io/
enforce`` label. :class:`NamespaceCache` holds every namespace's labels; :class:`NamespaceWatch`
keeps it current from the shared informer (``common.kube.informer``: list, watch from the
list's resourceVersion with bookmarks, list again on 410, resume after any other failure
with the shared backoff; an outage logged once). Until the first list has been applied (or
with no cluster access at all) every namespace's labels are unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from common.kube.informer import Informer, WatchEvent


class NamespaceCache:
    """Labels by namespace name; None for a namespace not (yet) known."""

    def __init__(self, synced: asyncio.Event | None = None) -> None:
        self._labels: dict[str, Mapping[str, str]] = {}
        #: set once the labels are complete (the informer's first list, or :meth:`replace`)
        self.synced_event = synced or asyncio.Event()

    @property
    def synced(self) -> bool:
        return self.synced_event.is_set()

    def labels(self, namespace: str) -> Mapping[str, str] | None:
        if not self.synced:
            return None
        return self._labels.get(namespace)

    def replace(self, items: Mapping[str, Mapping[str, str]]) -> None:
        """Every namespace's labels at once (complete: the cache is synced)."""
        self._labels = {name: MappingProxyType(dict(labels)) for name, labels in items.items()}
        self.synced_event.set()

    def put(self, namespace: str, labels: Mapping[str, str]) -> None:
        self._labels[namespace] = MappingProxyType(dict(labels))

    def remove(self, namespace: str) -> None:
        self._labels.pop(namespace, None)

    def __len__(self) -> int:
        return len(self._labels)


class NamespaceWatch:
    """Keeps a :class:`NamespaceCache` current from a namespace informer
    (``KubeClient.watch_namespaces()``)."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        # the informer sets ``synced`` once every event of its first list has been handled
        self.cache = NamespaceCache(informer.synced)

    @property
    def lists(self) -> int:
        return self.informer.lists

    @property
    def failures(self) -> int:
        return self.informer.failures

    @property
    def resource_version(self) -> str:
        return self.informer.resource_version

    async def run(self) -> None:
        """Run until cancelled."""
        async with contextlib.aclosing(self.informer.events()) as events:
            async for event in events:
                self._apply(event)

    def _apply(self, event: WatchEvent) -> None:
        name, labels = _name_labels(event.object)
        if not name:
            return
        if event.type == "DELETED":
            self.cache.remove(name)
        else:
            self.cache.put(name, labels)

    async def wait_for(self, predicate: Callable[[NamespaceWatch], bool]) -> None:
        """Return once ``predicate(self)`` holds (checked after every list, event, error)."""
        await self.informer.wait_until(lambda: predicate(self))


def _name_labels(item: Any) -> tuple[str, Mapping[str, str]]:
    meta = item.get("metadata") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        return "", {}
    labels = meta.get("labels") or {}
    clean = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return str(meta.get("name") or ""), clean
