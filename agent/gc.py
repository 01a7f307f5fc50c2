"""Garbage collection: older trees nobody uses, then blobs no tree links.

Eviction of whole models under disk pressure builds on this (the watermarks of DESIGN.md);
this module frees what is already unreachable, and reports the bytes truthfully: a blob that
another tree still links frees nothing.
"""

from __future__ import annotations

import asyncio
import logging

from agent.index import Index
from agent.metrics import Metrics
from agent.store.local import Store

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, store: Store, index: Index, metrics: Metrics | None = None) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics
        self._lock = asyncio.Lock()

    async def collect(self) -> int:
        """Remove unused older trees and unreferenced blobs; return the bytes freed."""
        async with self._lock:
            for model in self.index:
                m = model.manifest
                if m is None or not m.previous or model.in_use:
                    continue
                for tree in m.previous:
                    await asyncio.to_thread(self.store.drop_tree, model.key, tree)
                    log.info("removed an older tree", extra={"key": model.key, "tree": tree})
                model.manifest = self.store.manifest(model.key)
            keep: set[str] = set()
            for model in self.index:
                if model.intent is not None:
                    keep.update(model.intent.get("blobs", ()))
            for intent in (await asyncio.to_thread(self.store.intents)).values():
                keep.update(intent.get("blobs", ()))
            freed = await asyncio.to_thread(self._drop_unreferenced, keep)
            if self.metrics is not None and freed:
                self.metrics.evicted_bytes.labels(reason="unreferenced").inc(freed)
            return freed

    def _drop_unreferenced(self, keep: set[str]) -> int:
        freed = 0
        for digest in self.store.unreferenced_blobs(keep):
            freed += self.store.remove_blob(digest)
        return freed
