"""Read a model into the page cache before the pod that wants it loads it.

Between a pod's binding to this node and the start of its serving container, kubelet pulls
the container's image (often minutes). The agent knows the pod is coming, and its files
are on the local disk but cold in the page cache (the store writes them ``O_DIRECT``): it
reads them in that window, so the serving process loads its weights from memory.

:meth:`PageCacheWarmer.want` is the one entry point, called by whichever comes first: the
pod watch (``agent/cluster``: a pending pod bound to this node), an ensure through the
admin API (the pod's init container), a CSI publish. It never blocks and is idempotent: a
warming of the model that is queued or running is joined. A model still being pulled is
warmed once it is ready. One warming reads at a time (they share the disk and the rate).

Each request ends in exactly one of: a warming that ran to the end (``warmings_total``),
or a skip by reason (``warmings_skipped_total``): ``disabled`` (agent config),
``opted_out`` (the pod's ``modelcache.io/warm-memory: "false"``), ``download_mode`` (the pod
downloads its own copy), ``resident`` (already in the page cache), ``memory`` (stopped at
the memory floor), ``budget`` (stopped at the share of memory one warming may read),
``unavailable`` (the model failed, went away, or was not ready in time), ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.index import FAILED, READY, Index, Model
from agent.metrics import Metrics
from agent.pagecache.memory import MemoryProbe
from agent.pagecache.reader import Limits, Reader, Result
from agent.pagecache.resident import resident_bytes
from agent.settings import PageCacheSettings
from agent.store.local import Store
from agent.store.names import join_inside

log = logging.getLogger(__name__)
WARMED = "warmed"
T = TypeVar("T")


@dataclass
class Warming:
    """One model's warming, from the first request to its end."""

    key: str
    trigger: str
    """What asked first: ``pod``, ``ensure``, ``csi``."""
    task: asyncio.Task[str] | None = field(default=None, repr=False)
    """Resolves to the outcome: :data:`WARMED` or a skip reason."""
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    result: Result = field(default_factory=Result)
    outcome: str | None = None
    """Once it ended: :data:`WARMED` or the skip reason."""


class PageCacheWarmer:
    """``pod_refusal(namespace/name)``: why that pod's model must not be warmed (a reason),
    or None; the cluster side knows the pods' annotations."""

    def __init__(self, settings: PageCacheSettings, store: Store, index: Index,
                 metrics: Metrics | None = None, *, probe: MemoryProbe | None = None,
                 pod_refusal: Callable[[str], str | None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.metrics = metrics
        self.probe = probe or MemoryProbe()
        self.pod_refusal = pod_refusal or (lambda pod: None)
        self._warmings: dict[str, Warming] = {}
        self._ready: dict[str, asyncio.Future[Model | None]] = {}
        self._one_at_a_time = asyncio.Semaphore(1)
        self._closed = False
        self._listeners: list[Callable[[Warming], None]] = []
        index.on_change(self._changed)

    def on_done(self, listener: Callable[[Warming], None]) -> None:
        """Call ``listener`` (on the loop) with every warming that ends."""
        self._listeners.append(listener)

    def want(self, key: str, *, pod: str | None = None, trigger: str = "ensure"
             ) -> Warming | None:
        """Warm model ``key`` for ``pod`` (``namespace/name``, if a pod asks). Returns the
        warming (running, queued, or waiting for the pull), or None when skipped now."""
        if not self.settings.enabled:
            self._skipped("disabled")
            return None
        refusal = self.pod_refusal(pod) if pod else None
        if refusal is not None:
            self._skipped(refusal)
            log.debug("page cache not warmed for this pod", extra={
                "key": key, "pod": pod, "reason": refusal})
            return None
        current = self._warmings.get(key)
        if current is not None or self._closed:
            return current
        warming = Warming(key, trigger)
        self._warmings[key] = warming
        warming.task = asyncio.get_running_loop().create_task(
            self._run(warming), name=f"pagecache-{key}")
        return warming

    def current(self, key: str) -> Warming | None:
        return self._warmings.get(key)

    async def close(self) -> None:
        """Stop every warming (each reader ends within one chunk) and wait for them."""
        self._closed = True
        warmings = list(self._warmings.values())
        for w in warmings:
            w.stop.set()
        tasks = [w.task for w in warmings if w.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- one warming -----------------------------------------------------------------------

    async def _run(self, warming: Warming) -> str:
        try:
            outcome = await self._warm(warming)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("page-cache warming crashed", extra={"key": warming.key})
            outcome = "error"
        finally:
            self._warmings.pop(warming.key, None)
        if outcome == WARMED:
            if self.metrics:
                self.metrics.pagecache_warmings.inc()
        else:
            self._skipped(outcome)
        warming.outcome = outcome
        for listener in self._listeners:
            listener(warming)
        return outcome

    async def _warm(self, warming: Warming) -> str:
        model = await self._until_ready(warming.key)
        if model is None or model.manifest is None:
            return "unavailable"
        paths = self._paths(model)
        async with self._one_at_a_time:
            started = time.monotonic()
            try:
                resident, size = await _in_thread(warming.stop, self._resident, paths)
                if resident >= size:
                    warming.result.resident_bytes = size
                    return "resident"
                result = await _in_thread(warming.stop, self._read, warming, paths)
            except FileNotFoundError:  # evicted while we looked
                return "unavailable"
            except OSError as e:
                log.warning("cannot read a model into the page cache", extra={
                    "key": warming.key, "error": str(e)})
                return "error"
        log.info("page cache warmed" if result.stopped is None else "page-cache warming "
                 "stopped early", extra={
                     "key": warming.key, "trigger": warming.trigger,
                     "warmed_bytes": result.warmed_bytes, "resident_bytes": result.resident_bytes,
                     "stopped": result.stopped,
                     "seconds": round(time.monotonic() - started, 3)})
        return WARMED if result.stopped is None else result.stopped

    def _paths(self, model: Model) -> list[Path]:
        """The files of the model's published tree, each blob once, in manifest order."""
        assert model.manifest is not None
        tree = self.store.models / model.key / model.manifest.tree
        seen: set[str] = set()
        paths = []
        for f in model.manifest.files:
            if f.blake3 not in seen and f.size > 0:
                seen.add(f.blake3)
                paths.append(join_inside(tree, f.path))
        return paths

    @staticmethod
    def _resident(paths: list[Path]) -> tuple[int, int]:
        resident = size = 0
        for p in paths:
            r, s = resident_bytes(p)
            resident, size = resident + r, size + s
        return resident, size

    def _read(self, warming: Warming, paths: list[Path]) -> Result:
        s = self.settings
        memory = self.probe.read()
        limits = Limits(floor_bytes=int(memory.total * s.min_available),
                        budget_bytes=int(memory.node_total * s.max_share),
                        rate_bytes=s.rate_bytes, chunk_bytes=s.chunk_bytes)
        counter = self.metrics.pagecache_warmed_bytes if self.metrics else None
        reader = Reader(limits, self.probe, warming.stop,
                        on_warmed=counter.inc if counter is not None else lambda n: None)
        warming.result = reader.result
        return reader.run(paths)

    # --- waiting for a model that is being pulled ------------------------------------------

    async def _until_ready(self, key: str) -> Model | None:
        """The model once it is ready; None if it failed, is unknown and stays so, or is
        not ready within ``wait_ready`` seconds."""
        model = self.index.get(key)
        if model is not None and model.state == READY:
            return model
        if model is not None and model.state == FAILED:
            return None
        future = self._ready.setdefault(key, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(self.settings.wait_ready):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
        finally:
            if self._ready.get(key) is future:
                del self._ready[key]

    def _changed(self, model: Model) -> None:
        """Index listener: a wanted model became ready (or failed, or went away)."""
        future = self._ready.get(model.key)
        if future is None or future.done():
            return
        gone = self.index.get(model.key) is None
        if gone or model.state == FAILED:
            future.set_result(None)
        elif model.state == READY:
            future.set_result(model)

    def _skipped(self, reason: str) -> None:
        if self.metrics:
            self.metrics.pagecache_skipped.labels(reason=reason).inc()


async def _in_thread(stop: threading.Event, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a worker thread; if cancelled, set ``stop`` and wait for the thread
    to end (it checks the flag between chunks) rather than leave it running."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await future
        raise

