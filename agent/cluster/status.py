"""``status.nodes.<node>`` of the CachedModels this node keeps warm, and their Events.

Each tracked CachedModel gets this node's entry: ``state`` (pulling, ready, failed,
evicted), ``revision``, ``bytes``, ``lastTransitionTime`` and ``message``, written with
``common.kube``'s merge patch of that one key (agents on other nodes never conflict).
Writes are throttled: a state change is written at once; while a model is pulling, its
progress is written at most once per ``interval`` seconds per CachedModel, and less often on
a CachedModel that many nodes report on. Every status write reaches every agent (each
watches every CachedModel) carrying the whole object, about 300 bytes per node (its entry
and its managed fields): N agents writing progress every 30 s would have the apiserver send
300 * N**3 bytes per 30 s (300 GB at 1000 nodes). So each agent stretches its progress
interval to the number of nodes in the status divided by :data:`PROGRESS_WRITES_PER_SECOND`,
which bounds a CachedModel's progress writes across the cluster to about that rate (at 1000
nodes: one write per node every 1000 s; state changes still go at once). A state change
also records an Event on the CachedModel: ``Pulled`` (saying who signed it, under a verify
policy), ``PullFailed``, ``VerificationFailed`` (the signature, or the policy, failed; the
model is not published) or ``Evicted``.

The last entry written starts as what the CachedModel already shows, so a restart rewrites
nothing that has not changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from agent.index import FAILED, PULLING, READY, Index, Model
from common.errors import ModelcacheError, NotFound
from common.kube.client import KubeClient

log = logging.getLogger(__name__)
EVICTED = "evicted"
MAX_MESSAGE = 1024
MAX_REVISION = 256
RETRY_SECONDS = 5.0
Obj = dict[str, Any]
Entry = dict[str, Any]
#: the fields compared to decide whether an entry changed (not the transition time)
CONTENT = ("state", "revision", "bytes", "message", "verified")
#: progress writes of one CachedModel per second, all nodes together (state changes aside)
PROGRESS_WRITES_PER_SECOND = 1.0
#: failure reasons that make a ``VerificationFailed`` Event rather than ``PullFailed``
VERIFY_REASONS = ("verification", "unsigned", "verify_policy")


@dataclass
class Written:
    entry: Entry
    at: float
    """When it was written (clock seconds; -inf: found on the object)."""


@dataclass
class Target:
    """A CachedModel that wants one model on this node."""

    obj: Obj
    model_key: str
    error: str | None = None
    """Why this node cannot even start its pull (reference, Secret, access, policy), if so."""
    reason: str | None = None
    """The error's reason (``ModelcacheError.reason``)."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def due(last: Written | None, entry: Entry | None, now: float, interval: float) -> float | None:
    """When ``entry`` should be written (``now`` or later), or ``None`` if it need not be."""
    if entry is None:
        return None
    if last is None or last.entry.get("state") != entry["state"]:
        return now
    if all(last.entry.get(k) == entry.get(k) for k in CONTENT):
        return None
    if entry["state"] == PULLING:
        return max(now, last.at + interval)
    return now


class StatusWriter:
    def __init__(self, kube: KubeClient, node: str, index: Index, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.node = node
        self.index = index
        self.interval = interval
        self._clock = clock
        self.targets: dict[str, Target] = {}
        self._written: dict[str, Written] = {}
        self._clear: dict[str, Obj] = {}
        self._evictions: dict[str, str] = {}
        self._dirty = asyncio.Event()
        #: status writes sent (for tests)
        self.writes = 0
        index.on_change(self._changed)

    # --- what the controller says ----------------------------------------------------------

    def track(self, cm_key: str, obj: Obj, model_key: str) -> None:
        """The CachedModel ``cm_key`` wants ``model_key`` on this node."""
        target = self.targets.get(cm_key)
        if target is None or target.model_key != model_key:
            self.targets[cm_key] = Target(obj, model_key)
            self._clear.pop(cm_key, None)
            if cm_key not in self._written:
                found = ((obj.get("status") or {}).get("nodes") or {}).get(self.node)
                if isinstance(found, dict) and found.get("state"):
                    self._written[cm_key] = Written(found, -math.inf)
        else:
            target.obj = obj
        self._dirty.set()

    def untrack(self, cm_key: str, clear: bool) -> None:
        """The CachedModel no longer wants anything here; ``clear``: remove this node's
        entry (it still exists but no longer selects this node)."""
        target = self.targets.pop(cm_key, None)
        written = self._written.pop(cm_key, None)
        if clear and target is not None and written is not None:
            self._clear[cm_key] = target.obj
        self._dirty.set()

    def fail(self, cm_key: str, message: str | None, reason: str | None = None) -> None:
        """Report (or, with ``None``, stop reporting) a failure that precedes any pull."""
        target = self.targets.get(cm_key)
        if target is not None and target.error != message:
            target.error, target.reason = message, reason
            self._dirty.set()

    def evicted(self, model_key: str, reason: str) -> None:
        """Why a model is about to leave the store (the evictor's hook)."""
        self._evictions[model_key] = reason

    def _changed(self, model: Model) -> None:
        if self.index.get(model.key) is model:
            self._evictions.pop(model.key, None)  # back in the store: no longer evicted
        if any(t.model_key == model.key for t in self.targets.values()):
            self._dirty.set()

    # --- writing ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            wake = await self.flush()
            timeout = None if wake is None else max(0.0, wake - self._clock())
            with contextlib.suppress(TimeoutError):  # (not wait_for: see agent/warm.py)
                async with asyncio.timeout(timeout):
                    await self._dirty.wait()
            self._dirty.clear()

    async def flush(self) -> float | None:
        """Write what is due; return when to look again (``None``: at the next change)."""
        wake: float | None = None
        for cm_key, obj in list(self._clear.items()):
            if await self._write(cm_key, obj, None):
                self._clear.pop(cm_key, None)
            else:
                wake = _earliest(wake, self._clock() + RETRY_SECONDS)
        for cm_key, target in list(self.targets.items()):
            model = self.index.get(target.model_key)
            last = self._written.get(cm_key)
            entry = self.entry(target, model, last)
            now = self._clock()
            interval = self.progress_interval(target.obj)
            when = due(last, entry, now, interval)
            if model is not None and model.state == PULLING:
                wake = _earliest(wake, (last.at if last else now) + interval)
            if when is None or entry is None:
                continue
            if when > now:
                wake = _earliest(wake, when)
                continue
            if self.targets.get(cm_key) is not target:
                continue  # untracked while we were writing another
            if await self._write(cm_key, target.obj, entry):
                self._written[cm_key] = Written(entry, self._clock())
                await self._event(target, last, entry)
            else:
                wake = _earliest(wake, self._clock() + RETRY_SECONDS)
        return wake

    def progress_interval(self, obj: Obj) -> float:
        """Least seconds between two progress writes to ``obj``: the configured interval,
        stretched on a CachedModel that many nodes report on (see the module's text)."""
        nodes = (obj.get("status") or {}).get("nodes")
        count = len(nodes) if isinstance(nodes, dict) else 0
        return max(self.interval, count / PROGRESS_WRITES_PER_SECOND)

    def entry(self, target: Target, model: Model | None, last: Written | None) -> Entry | None:
        """This node's entry for ``target`` now (``None``: nothing to report yet)."""
        message: str | None
        verified = None
        if target.error is not None:
            state, revision, size, message = FAILED, None, None, target.error
        elif model is None:
            if last is None or last.entry.get("state") not in (READY, PULLING, EVICTED):
                return None  # never here yet
            state, revision, size = EVICTED, last.entry.get("revision"), 0
            message = self._evictions.get(target.model_key, "evicted from this node's cache")
        else:
            state = model.state
            revision = model.manifest.revision if model.manifest else None
            size = model.manifest.size_bytes if model.state == READY and model.manifest \
                else model.bytes_done
            message = model.error if model.state == FAILED else None
            check = model.to_json()["verified"] if model.state == READY else None
            if check is not None:
                verified = {"policy": check["policy"], "signer": _cut(check["signer"], 1024),
                            "time": check["time"]}
        transition = now_iso()
        if last is not None and last.entry.get("state") == state:
            transition = last.entry.get("lastTransitionTime") or transition
        return {"state": state, "revision": _cut(revision, MAX_REVISION), "bytes": size,
                "lastTransitionTime": transition, "message": _cut(message, MAX_MESSAGE),
                "verified": verified}

    async def _write(self, cm_key: str, obj: Obj, entry: Entry | None) -> bool:
        namespace, _, name = cm_key.partition("/")
        try:
            self.writes += 1
            await self.kube.patch_cached_model_status(namespace, name, self.node, entry)
        except NotFound:
            return True  # the CachedModel is gone: nothing to report to
        except ModelcacheError as e:
            log.warning("status not written; retrying", extra={
                "cachedmodel": cm_key, "node": self.node, "error": str(e)})
            return False
        return True

    async def _event(self, target: Target, last: Written | None, entry: Entry) -> None:
        state = entry["state"]
        if last is not None and last.entry.get("state") == state:
            return
        kind: Literal["Normal", "Warning"] = "Normal"
        if state == READY:
            reason = "Pulled"
            note = (f"ready on node {self.node}: revision {entry['revision']}, "
                    f"{entry['bytes']} bytes")
            if entry.get("verified"):
                check = entry["verified"]
                note += f"; signature verified under {check['policy']}, by {check['signer']}"
        elif state == FAILED:
            reason, kind = "PullFailed", "Warning"
            model = self.index.get(target.model_key)
            why = target.reason if target.error is not None else (
                model.error_reason if model is not None else None)
            if why in VERIFY_REASONS:
                reason = "VerificationFailed"
            note = f"pull failed on node {self.node}: {entry['message']}"
        elif state == EVICTED:
            reason = "Evicted"
            note = f"evicted from node {self.node}: {entry['message']}"
        else:
            return
        await self.kube.emit_event(target.obj, reason, note, kind)


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."
