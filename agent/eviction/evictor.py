"""Eviction under disk pressure (DESIGN.md, "Eviction").

Limits, on the store's filesystem and on the cache:

- watermarks: when the filesystem's used bytes plus what running pulls still need pass
  ``high``, models are evicted until they are back under ``low``;
- an optional quota on the cache's own bytes (distinct blobs, plus what pulls still need);
- an inode floor: the fraction of the filesystem's inodes that stays free.

They are checked periodically (:meth:`Evictor.run`) and before every pull: the space pulls
reserve (:mod:`agent.eviction.reservations`, recorded in :mod:`agent.eviction.ledger`)
counts as used, and admitting a pull asks the evictor to make room (:meth:`Evictor.free`).

Victims: least recently used first among ready models that are not in use, not pinned and
not being pulled or refreshed. Older trees of models not in use go before any model does.
A model goes manifest first (it stops being visible, durably), then its trees, then the
blobs whose last link went with it, so a crash leaves each model complete or invisible. The
bytes reported freed are those of blobs whose last link went away: content another model
still uses stays, and frees nothing.

In use: ``Model.holders`` is the one source of truth. Standalone, leases taken through the
API (holder ``lease:<owner>``, :mod:`agent.eviction.leases`) are kept in
``<store>/leases.json``; in a cluster the pod informer adds ``pod:<namespace>/<name>``.
After a restart nothing is evicted until ``Evictor.in_use_known`` is set: standalone once
the leases are loaded, in a cluster once the pod informer has synced (see
``docs/eviction.md``).

Every eviction is a metric, a log line and a call of the ``on_evict`` hooks (the cluster
side turns them into Kubernetes Events). Decisions are taken on the event loop under one
lock (:attr:`Evictor.lock`); disk work and the victim plan run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.eviction.leases import Leases
from agent.eviction.ledger import Ledger
from agent.eviction.limits import Disk, Limits, Shortfall, measure, plan, shortfall
from agent.eviction.usage import Usage
from agent.index import FAILED, READY, Index, Model
from agent.metrics import Metrics
from agent.settings import StoreSettings
from agent.store.local import Store
from agent.store.trees import FileEntry
from common.errors import Conflict, NotFound, StoreError

log = logging.getLogger(__name__)

ORPHAN_GRACE_SECONDS = 60.0
"""An unreferenced blob written this recently may belong to a pull that has not recorded
it yet: it is left for a later pass."""
ROUNDS = 4
"""Plan-evict-measure rounds (a plan can overestimate what shared blobs free)."""
STUCK_LOG_SECONDS = 600.0
"""While eviction cannot get under the limits, it says so this often."""
BATCH = 64
"""Victims removed per thread hand-off (each batch is logged as it completes)."""


@dataclass(frozen=True)
class Eviction:
    """One evicted model, as logs, metrics and hooks see it."""

    key: str
    uri: str
    reason: str
    """``watermark``, ``quota``, ``inodes``, ``no_space`` or ``api``."""
    freed_bytes: int
    """Bytes of the blobs whose last link went with this model."""
    size_bytes: int
    last_used: float


@dataclass(frozen=True)
class _Step:
    garbage: int
    short: Shortfall
    victims: list[tuple[str, str]] = field(default_factory=list)
    left: Shortfall = field(default_factory=Shortfall)
    would_free: int = 0


@dataclass(frozen=True)
class Relief:
    """What :meth:`Evictor.free` did."""

    freed: int
    short: Shortfall
    evictable: int
    """Bytes every possible victim would have freed (known when the plan fell short)."""


# --- the evictor -----------------------------------------------------------------------------


class Evictor:
    """Keeps the store under its limits, leaving room for what ``ledger`` says running
    pulls still need; ``leases`` end with a model removed by force."""

    def __init__(self, store: Store, index: Index, settings: StoreSettings, usage: Usage,
                 ledger: Ledger, leases: Leases, metrics: Metrics | None = None,
                 orphan_grace: float = ORPHAN_GRACE_SECONDS) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics
        self.limits = Limits.of(settings)
        self.limits.check()
        self.interval = settings.evict_interval
        self.orphan_grace = orphan_grace
        self.in_use_known = usage.known
        """Set once who uses which model is known (standalone: leases loaded; in a cluster:
        the pod informer synced). Until then nothing is evicted."""
        self._ledger = ledger
        self._leases = leases
        self._hooks: list[Callable[[Eviction], None]] = []
        self._before: list[Callable[[str, str], None]] = []
        self._pressure: list[Callable[[str], Awaitable[None]]] = []
        self.lock = asyncio.Lock()
        """Held while a decision about space is taken: a sweep here, admitting a pull or
        relieving one (:mod:`agent.eviction.reservations`)."""
        self._evicting: dict[str, asyncio.Event] = {}
        self._stuck_logged: float | None = None
        self._show_limits()

    # --- settings, hooks, gauges -----------------------------------------------------------

    def set_limits(self, **changes: Any) -> Limits:
        """Change ``high``, ``low``, ``quota_bytes`` or ``min_free_inodes`` at run time."""
        limits = replace(self.limits, **changes)
        limits.check()
        self.limits = limits
        self._show_limits()
        return limits

    def on_evicting(self, hook: Callable[[str, str], None]) -> None:
        """Call ``hook(key, reason)`` just before a model leaves the index (the cluster side
        records why, for the status and Event it writes when the model is gone)."""
        self._before.append(hook)

    def on_pressure(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Await ``hook(message)`` after each sweep the store's limits forced (the cluster
        side turns it into a Node Event)."""
        self._pressure.append(hook)

    def on_evict(self, hook: Callable[[Eviction], None]) -> None:
        """Call ``hook`` (on the event loop) after every eviction, e.g. to emit an Event."""
        self._hooks.append(hook)

    def _show_limits(self) -> None:
        if self.metrics is not None:
            self.metrics.store_watermark.labels(level="high").set(self.limits.high)
            self.metrics.store_watermark.labels(level="low").set(self.limits.low)

    async def settled(self, key: str) -> None:
        """Wait until an eviction of ``key`` that is under way is done (its old trees must
        be gone before a new pull of it publishes)."""
        evicting = self._evicting.get(key)
        if evicting is not None:
            await evicting.wait()

    # --- periodic checks, gc, removal -------------------------------------------------------

    async def run(self) -> None:
        """Check the limits every ``interval`` seconds (a task of the agent)."""
        await self.in_use_known.wait()
        while True:
            try:
                self._touch_in_use()
                await self._leases.expire()
                await self.check()
            except Exception:
                log.exception("eviction check failed")
            await asyncio.sleep(self.interval)

    async def check(self) -> int:
        """Above the high watermark, the quota or under the inode floor: evict down to the
        low watermark (and under the quota, above the floor). Returns the bytes freed."""
        if not self.in_use_known.is_set():
            return 0
        async with self.lock:
            disk, pending, _ = await self._ledger.look()
            if not shortfall(self.limits, disk, pending, self.limits.high):
                return 0
            relief = await self.free(pending, self.limits.low, strict=False)
            await self._report_pressure(disk, relief)
            now = time.monotonic()
            if not relief.short:
                self._stuck_logged = None
            elif self._stuck_logged is None or now - self._stuck_logged > STUCK_LOG_SECONDS:
                self._stuck_logged = now
                log.warning("cannot get under the store's limits: what is left is in use, "
                            "pinned or being pulled", extra=_short_fields(relief.short))
            return relief.freed

    async def _report_pressure(self, disk: Disk, relief: Relief) -> None:
        message = (f"store {self.store.root} over its limits ({disk.used} of {disk.capacity}"
                   f" bytes used, high watermark {self.limits.high:.0%}): freed "
                   f"{relief.freed} bytes" + (
                       "; still short: what is left is in use, pinned or being pulled"
                       if relief.short else ""))
        for hook in self._pressure:
            try:
                await hook(message)
            except Exception:
                log.exception("pressure hook failed")

    async def collect(self) -> int:
        """``POST /api/v1/gc``: drop older trees nobody uses, every unreferenced blob and
        abandoned partial downloads, then evict down to the low watermark. Returns the bytes
        freed."""
        async with self.lock:
            freed = await self._collect_garbage()
            freed += await self.discard_partials(None, quiet=True)
            if self.in_use_known.is_set():
                _, pending, _ = await self._ledger.look()
                freed += (await self.free(pending, self.limits.low, strict=False,
                                           cleanup=False)).freed
            return freed

    async def remove(self, key: str, force: bool = False) -> tuple[Model, int]:
        """``DELETE /api/v1/models/{key}``: evict one model now (a running pull is stopped).
        Refused while the model is in use unless ``force``. Returns it and the bytes freed."""
        model = self.index.get(key)
        if model is None:
            raise NotFound(f"model {key} is not in the store")
        if not force and not self.in_use_known.is_set():
            raise Conflict(f"model {key} may be in use: the agent does not know yet which "
                           "models are (it just started); retry shortly, or use force")
        if not force and model.in_use:
            raise Conflict(f"model {key} is in use ({', '.join(sorted(model.holders))}); "
                           "use force to remove it anyway")
        intent = model.intent
        if model.task is not None and not model.task.done():
            model.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await model.task
        async with self.lock:
            if self.index.get(key) is not model or key in self._evicting:
                raise NotFound(f"model {key} was removed meanwhile")
            freed = await self._evict([(model, "api")], force=True)
            if intent is not None:
                await asyncio.to_thread(self.store.discard_partials, intent.get("refs", ()))
        await self._leases.drop(key)
        return model, freed

    def _touch_in_use(self) -> None:
        """A model in use is being used now: its last use moves with the clock."""
        now = time.time()
        for model in self.index:
            if model.in_use:
                model.last_used = now

    # --- freeing space ---------------------------------------------------------------------

    async def free(self, extra: int, level: float, *, space: int = 0,
                    reason: str | None = None, strict: bool, cleanup: bool = True) -> Relief:
        """Evict until ``extra`` more bytes fit under ``level`` and the other limits; first
        (``cleanup``) drop older trees nobody uses and unreferenced blobs. ``strict``: if
        even every candidate would not do, evict nothing and report it."""
        freed = 0
        for round_ in range(ROUNDS):
            trees = self._older_trees() if cleanup and round_ == 0 else []
            candidates = self._candidates()
            order = [(m.key, m.manifest.files) for m in candidates if m.manifest is not None]
            step = await asyncio.to_thread(self._step, trees, self._keep(), cleanup and
                                           round_ == 0, order, extra, level, space)
            freed += self._cleaned(trees, step.garbage)
            if not step.short or not order:
                return Relief(freed, step.short, 0)
            if step.left and strict and round_ == 0:
                return Relief(freed, step.left, step.would_free)
            by_key = {m.key: m for m in candidates}
            freed += await self._evict([(by_key[k], reason or why) for k, why in step.victims])
        disk = await asyncio.to_thread(self._disk)
        return Relief(freed, shortfall(self.limits, disk, extra, level, space), 0)

    def _step(self, trees: list[tuple[str, tuple[str, ...]]], keep: frozenset[str],
              cleanup: bool, order: list[tuple[str, tuple[FileEntry, ...]]], extra: int,
              level: float, space: int) -> _Step:
        """One round, in a thread: garbage, a measure, and the victims to meet the limits."""
        refs: Counter[str] = Counter()
        for manifest in self.store.manifests():
            refs.update(f.blake3 for f in manifest.files)
        garbage = 0
        if cleanup:
            self._drop_trees(trees)
            garbage = self._drop_blobs(d for d in self.store.blob_sizes()
                                       if d not in refs and d not in keep)
        disk = measure(self.store)
        short = shortfall(self.limits, disk, extra, level, space)
        if not short or not order:
            return _Step(garbage, short)
        refs.update(keep)
        victims, left, would_free = plan(order, refs, short, disk.block)
        return _Step(garbage, short, victims, left, would_free)

    def _candidates(self) -> list[Model]:
        """Models that may be evicted, least recently used first."""
        found = [m for m in self.index if self._evictable(m)]
        found.sort(key=lambda m: (m.last_used, m.key))
        return found

    def _evictable(self, model: Model) -> bool:
        return (model.manifest is not None and model.state in (READY, FAILED)
                and not model.refreshing and (model.task is None or model.task.done())
                and not model.pinned and not model.in_use and model.key not in self._evicting)

    def _keep(self) -> frozenset[str]:
        """Blobs running pulls have committed or found (not garbage yet)."""
        return frozenset(d for m in self.index if m.intent is not None
                         for d in m.intent.get("blobs", ()))

    async def _evict(self, victims: list[tuple[Model, str]], force: bool = False) -> int:
        """Take the victims out of the index, then off the disk in threads (manifest, trees,
        then blobs whose last link went), batch by batch; record each eviction."""
        chosen: list[tuple[Model, str]] = []
        for n, (model, reason) in enumerate(victims):
            if n and n % BATCH == 0:
                await asyncio.sleep(0)  # thousands of victims: let the API answer meanwhile
            if model.manifest is None and not force:
                continue
            if (force or self._evictable(model)) and self.index.get(model.key) is model:
                for before in self._before:
                    before(model.key, reason)
                self.index.remove(model.key)
                self._evicting[model.key] = asyncio.Event()
                chosen.append((model, reason))
        keep = self._keep()
        freed = 0
        try:
            for start in range(0, len(chosen), BATCH):
                batch = chosen[start:start + BATCH]
                work = [(m.key, m.manifest.files if m.manifest else ()) for m, _ in batch]
                thread = asyncio.ensure_future(asyncio.to_thread(self._remove_models, work, keep))
                try:
                    results = await asyncio.shield(thread)
                except asyncio.CancelledError:  # the batch on disk finishes: account for it
                    freed += self._settle(batch, await thread)
                    raise
                freed += self._settle(batch, results)
        finally:
            for model, _ in chosen:  # not reached (cancelled): still on disk, so visible
                event = self._evicting.pop(model.key, None)
                if event is not None:
                    if self.store.manifest(model.key) is not None:
                        self.index.add(model)
                    event.set()
        return freed

    def _settle(self, batch: list[tuple[Model, str]], results: list[int | Exception]) -> int:
        freed = 0
        for (model, reason), result in zip(batch, results, strict=True):
            if isinstance(result, int):
                freed += result
                self._record(model, reason, result)
            else:
                log.error("evicting a model failed", extra={"key": model.key,
                                                            "error": str(result)})
                if self.store.manifest(model.key) is not None:
                    self.index.add(model)
            self._evicting.pop(model.key).set()
        return freed

    def _remove_models(self, work: list[tuple[str, tuple[FileEntry, ...]]],
                       keep: frozenset[str]) -> list[int | Exception]:
        results: list[int | Exception] = []
        for key, files in work:
            try:
                self.store.remove_model(key)
                self.store.remove_intent(key)
                results.append(self.store.remove_unreferenced(
                    {f.blake3 for f in files} - keep))
            except (OSError, StoreError) as e:
                results.append(e)
        return results

    def _record(self, model: Model, reason: str, freed: int) -> None:
        size = model.manifest.size_bytes if model.manifest is not None else model.bytes_total
        event = Eviction(model.key, model.ref.display, reason, freed, size, model.last_used)
        if self.metrics is not None:
            self.metrics.evictions.labels(reason=reason).inc()
            self.metrics.evicted_bytes.labels(reason=reason).inc(freed)
        log.info("evicted model", extra={
            "key": event.key, "uri": event.uri, "reason": reason, "freed_bytes": freed,
            "size_bytes": size, "last_used": round(model.last_used, 3)})
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("eviction hook failed", extra={"key": model.key})

    def _older_trees(self) -> list[tuple[str, tuple[str, ...]]]:
        """Older trees of models not in use (nor being pulled): they go first."""
        return [(m.key, m.manifest.previous) for m in self.index
                if m.manifest is not None and m.manifest.previous and not m.in_use
                and not m.refreshing and (m.task is None or m.task.done())]

    async def _collect_garbage(self) -> int:
        """Older trees nobody uses, then every blob no tree links: a scan of ``blobs/``
        (blobs no manifest names are checked on disk: an older tree may link them)."""
        trees = self._older_trees()
        keep = self._keep()

        def collect() -> int:
            self._drop_trees(trees)
            named = {f.blake3 for m in self.store.manifests() for f in m.files}
            named.update(d for i in self.store.intents().values() for d in i.get("blobs", ()))
            return self._drop_blobs(d for d in self.store.blobs.digests()
                                    if d not in named and d not in keep)

        return self._cleaned(trees, await asyncio.to_thread(collect))

    def _cleaned(self, trees: list[tuple[str, tuple[str, ...]]], freed: int) -> int:
        for key, _ in trees:
            model = self.index.get(key)
            current = self.store.manifest(key)
            if model is not None and current is not None:
                model.manifest = current
        if freed:
            if self.metrics is not None:
                self.metrics.evicted_bytes.labels(reason="unreferenced").inc(freed)
            log.info("removed unreferenced blobs", extra={
                "freed_bytes": freed, "older_trees": sum(len(t) for _, t in trees)})
        return freed

    def _drop_trees(self, trees: list[tuple[str, tuple[str, ...]]]) -> None:
        for key, names in trees:
            for tree in names:
                try:
                    self.store.drop_tree(key, tree)
                except (OSError, StoreError) as e:
                    log.warning("cannot remove an older tree",
                                extra={"key": key, "tree": tree, "error": str(e)})

    def _drop_blobs(self, candidates: Iterable[str]) -> int:
        """Remove the unreferenced blobs among ``candidates`` older than the grace."""
        old = time.time() - self.orphan_grace
        return self.store.remove_unreferenced(d for d in candidates if self._older(d, old))

    def _older(self, digest: str, than: float) -> bool:
        modified = self.store.blobs.modified(digest)
        return modified is None or modified < than

    # --- partial downloads -----------------------------------------------------------------

    async def discard_partials(self, key: str | None, quiet: bool = False) -> int:
        """Remove the partial downloads of the pull of ``key`` (``None``: every partial no
        running pull names) that no writer holds."""
        if key is None:
            live = {r for m in self.index if m.intent is not None
                    for r in m.intent.get("refs", ())}

            def abandoned() -> list[str]:  # not named by a pull running or to be resumed
                named = live | {r for i in self.store.intents().values()
                                for r in i.get("refs", ())}
                return [ref for ref in self.store.partial_refs() if ref not in named]

            names = await asyncio.to_thread(abandoned)
        else:
            model = self.index.get(key)
            names = list(model.intent.get("refs", ())) if model and model.intent else []
        freed = await asyncio.to_thread(self.store.discard_partials, names)
        if freed and not quiet:
            log.info("removed partial downloads", extra={"key": key, "freed_bytes": freed})
        return freed

    # --- measuring and explaining ----------------------------------------------------------

    def _disk(self) -> Disk:
        return measure(self.store)


def _short_fields(short: Shortfall) -> dict[str, int]:
    return {"short_" + k: max(0, v) for k, v in vars(short).items()}
