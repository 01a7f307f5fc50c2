"""The counts controller: each CachedModel's ``status.ready/pulling/failed``, summed from the
NodeCaches (one per node, written by its own agent).

It runs in the webhook's replica that holds the Lease ``modelcache-counts``
(``common.kube.lease``): one watcher of the NodeCaches in the cluster, however many nodes.
Each NodeCache event moves the sums by what changed in that one object (an entry counts for
the CachedModel of its namespace, name and uid: a re-created CachedModel starts again from
what nodes report for it). A CachedModel whose counts differ from its status is written at
once if it was not written in the last ``interval`` seconds, else when that time is up, so
its writes (each sent to every agent, since every agent watches CachedModels) are at most
one per ``interval`` whatever the number of nodes or of their reports. Nothing is written
before both informers have listed; a CachedModel no node reports on shows zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from common.errors import ModelcacheError, NotFound
from common.kube.client import COUNTED_STATES, KubeClient
from common.kube.informer import WatchEvent, object_key

log = logging.getLogger(__name__)
Obj = dict[str, Any]
#: (namespace/name, uid) of a CachedModel
Target = tuple[str, str]
RETRY_SECONDS = 5.0


def reported(node_cache: Obj | None) -> Counter[tuple[Target, str]]:
    """What one NodeCache reports: how many entries per CachedModel and state."""
    out: Counter[tuple[Target, str]] = Counter()
    for item in ((node_cache or {}).get("status") or {}).get("models") or []:
        if isinstance(item, dict) and item.get("state") in COUNTED_STATES:
            target = (f"{item.get('namespace', '')}/{item.get('name', '')}",
                      str(item.get("uid") or ""))
            out[target, item["state"]] += 1
    return out


class Counts:
    def __init__(self, kube: KubeClient, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.interval = interval
        self._clock = clock
        self.node_caches = kube.watch_node_caches()
        self.cached_models = kube.watch_cached_models()
        self.sums: Counter[tuple[Target, str]] = Counter()
        #: what each NodeCache reported last (the informer's store is already updated when
        #: a handler runs)
        self._reported: dict[str, Counter[tuple[Target, str]]] = {}
        self._dirty: set[str] = set()
        self._written_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        #: status writes sent (for tests)
        self.writes = 0

    async def run(self) -> None:
        """Until cancelled (while this replica leads)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.watch(), name="counts-informers")
            tasks.create_task(self._writer(), name="counts-writer")

    async def watch(self) -> None:
        """Keep the sums current (the informers), without writing."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.node_caches.run(self._on_node_cache), name="nodecaches")
            tasks.create_task(self.cached_models.run(self._on_cached_model),
                              name="cachedmodels")

    # --- inputs --------------------------------------------------------------------------

    async def _on_node_cache(self, event: WatchEvent) -> None:
        node = object_key(event.object)
        before = self._reported.pop(node, Counter())
        after = reported(None if event.type == "DELETED" else event.object)
        if after:
            self._reported[node] = after
        self.sums.update(after)
        self.sums.subtract(before)
        for gone in [k for k in before if self.sums[k] <= 0]:
            del self.sums[gone]
        changed = {cm for (cm, _), _ in (after - before) + (before - after)}
        self._mark(changed)

    async def _on_cached_model(self, event: WatchEvent) -> None:
        key = object_key(event.object)
        if event.type == "DELETED":
            self._dirty.discard(key)
            self._written_at.pop(key, None)
        else:
            self._mark({key})

    def _mark(self, keys: set[str]) -> None:
        if keys:
            self._dirty |= keys
            self._wake.set()

    # --- output --------------------------------------------------------------------------

    def counts(self, obj: Obj) -> dict[str, int]:
        """What ``obj``'s status should say."""
        meta = obj.get("metadata") or {}
        target = (object_key(obj), str(meta.get("uid") or ""))
        return {s: max(0, self.sums[target, s]) for s in COUNTED_STATES}

    async def _writer(self) -> None:
        await self.node_caches.synced.wait()
        await self.cached_models.synced.wait()
        self._dirty |= set(self.cached_models.store)
        while True:
            wake = await self.flush()
            timeout = None if wake is None else max(0.0, wake - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()

    async def flush(self) -> float | None:
        """Write the counts that are due; return when to look again (``None``: at the next
        change)."""
        wake = math.inf
        for key in sorted(self._dirty):
            obj = self.cached_models.store.get(key)
            if obj is None:
                self._dirty.discard(key)
                continue
            want = self.counts(obj)
            status = obj.get("status") or {}
            if all(status.get(s) == n for s, n in want.items()):
                self._dirty.discard(key)
                continue
            now = self._clock()
            at = self._written_at.get(key, -math.inf) + self.interval
            if at > now:
                wake = min(wake, at)
                continue
            namespace, _, name = key.partition("/")
            self.writes += 1
            try:
                await self.kube.patch_cached_model_counts(namespace, name, want)
            except NotFound:
                self._dirty.discard(key)
                continue
            except ModelcacheError as e:
                log.warning("counts not written; retrying", extra={
                    "cachedmodel": key, "error": str(e)})
                wake = min(wake, self._clock() + RETRY_SECONDS)
                continue
            self._written_at[key] = self._clock()
            self._dirty.discard(key)
        return None if wake == math.inf else wake
