"""This node's NodeCache: what it holds for each CachedModel that selects it, and Events.

The NodeCache (cluster-scoped, named after the node, owned by its Node) is this agent's
own object: no one else writes it. Its ``status.models`` has one entry per tracked
CachedModel (``namespace``, ``name``, ``uid``, the model's ``key``, ``state`` (pulling,
ready, failed, evicted), ``revision``, ``bytes``, ``lastTransitionTime``, ``message``,
``verified``), beside the node's own counts. The whole status is written at once: created
on the first report, then a merge patch. A state change is written at once; while a model
is pulling its progress at most once per ``interval`` seconds. A write reaches only the
counts controller (the webhook's leader), which sums the NodeCaches into each CachedModel's
status: what a report costs never grows with the number of nodes (docs/architecture.md,
"The control plane at 1,000 nodes"). A state change also records an Event on the
CachedModel: ``Pulled`` (saying who signed it, under a verify policy), ``PullFailed``,
``VerificationFailed`` (the signature, or the policy, failed; the model is not published)
or ``Evicted``.

Nothing is written before ``known`` is set (the warm controller has tracked what the
CachedModels ask of this node), and the last entries written start as what the NodeCache
already shows, so a restart rewrites nothing that has not changed and drops the entries of
CachedModels that went away meanwhile.
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
from common.backoff import Backoff
from common.errors import Conflict, ModelcacheError, NotFound
from common.kube.client import COUNTED_STATES, KubeClient

log = logging.getLogger(__name__)
EVICTED = "evicted"
MAX_MESSAGE = 1024
MAX_REVISION = 256
RETRY_SECONDS = 5.0
Obj = dict[str, Any]
Entry = dict[str, Any]
#: the fields compared to decide whether an entry changed (not the transition time)
CONTENT = ("uid", "key", "state", "revision", "bytes", "message", "verified")
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
        #: what the NodeCache holds, by CachedModel (as written, or as found at start-up)
        self._written: dict[str, Written] = {}
        self._evictions: dict[str, str] = {}
        self._dirty = asyncio.Event()
        #: set once the warm controller has tracked what the CachedModels ask of this node
        self.known = asyncio.Event()
        #: the Node (the NodeCache's owner), once the node informer has seen it
        self.node_object: Obj | None = None
        #: whether the NodeCache exists (``None``: not read yet)
        self._exists: bool | None = None
        #: NodeCache writes sent (for tests)
        self.writes = 0
        index.on_change(self._changed)

    # --- what the controller says ----------------------------------------------------------

    def track(self, cm_key: str, obj: Obj, model_key: str) -> None:
        """The CachedModel ``cm_key`` wants ``model_key`` on this node."""
        target = self.targets.get(cm_key)
        if target is None or target.model_key != model_key:
            self.targets[cm_key] = Target(obj, model_key)
        else:
            target.obj = obj
        self._dirty.set()

    def untrack(self, cm_key: str) -> None:
        """The CachedModel no longer wants anything here (deleted, or it no longer selects
        this node): its entry goes."""
        self.targets.pop(cm_key, None)
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

    def node_seen(self, node: Obj) -> None:
        """The Node as the informer last saw it (the owner of the NodeCache)."""
        self.node_object = node

    def _changed(self, model: Model) -> None:
        if self.index.get(model.key) is model:
            self._evictions.pop(model.key, None)  # back in the store: no longer evicted
        if any(t.model_key == model.key for t in self.targets.values()):
            self._dirty.set()

    # --- writing ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.known.wait()
        await self.load()
        while True:
            wake = await self.flush()
            timeout = None if wake is None else max(0.0, wake - self._clock())
            with contextlib.suppress(TimeoutError):  # (not wait_for: see agent/warm.py)
                async with asyncio.timeout(timeout):
                    await self._dirty.wait()
            self._dirty.clear()

    async def load(self) -> None:
        """Read the NodeCache as an earlier run left it (retried until the API answers)."""
        backoff = Backoff(0.5, RETRY_SECONDS)
        while self._exists is None:
            try:
                found = await self.kube.get_node_cache(self.node)
            except NotFound:
                self._exists = False
                return
            except ModelcacheError as e:
                log.warning("nodecache not read; retrying", extra={
                    "node": self.node, "error": str(e)})
                await backoff.wait(e)
                continue
            self._exists = True
            for item in (found.get("status") or {}).get("models") or []:
                if isinstance(item, dict) and item.get("state"):
                    cm_key = f"{item.get('namespace', '')}/{item.get('name', '')}"
                    self._written[cm_key] = Written(item, -math.inf)

    async def flush(self) -> float | None:
        """Write the NodeCache if anything in it is due; return when to look again
        (``None``: at the next change)."""
        now = self._clock()
        wake: float | None = None
        shown: dict[str, Written] = {}
        changed: list[tuple[Target, Written | None, Entry]] = []
        for cm_key, target in self.targets.items():
            model = self.index.get(target.model_key)
            last = self._written.get(cm_key)
            entry = self.entry(cm_key, target, model, last)
            if model is not None and model.state == PULLING:
                wake = _earliest(wake, (last.at if last else now) + self.interval)
            when = due(last, entry, now, self.interval)
            if entry is not None and when is not None and when <= now:
                shown[cm_key] = Written(entry, now)
                changed.append((target, last, entry))
                continue
            if when is not None:
                wake = _earliest(wake, when)
            if last is not None:
                shown[cm_key] = last
        if not changed and shown.keys() == self._written.keys():
            return wake
        if not await self._write([w.entry for _, w in sorted(shown.items())]):
            return _earliest(wake, self._clock() + RETRY_SECONDS)
        self._written = shown
        for target, last, entry in changed:
            await self._event(target, last, entry)
        return wake

    def entry(self, cm_key: str, target: Target, model: Model | None,
              last: Written | None) -> Entry | None:
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
        namespace, _, name = cm_key.partition("/")
        uid = (target.obj.get("metadata") or {}).get("uid")
        out = {"namespace": namespace, "name": name, "uid": uid,
               "key": target.model_key or None, "state": state,
               "revision": _cut(revision, MAX_REVISION), "bytes": size,
               "lastTransitionTime": transition, "message": _cut(message, MAX_MESSAGE),
               "verified": verified}
        return {k: v for k, v in out.items() if v is not None}

    def status(self, entries: list[Entry]) -> Obj:
        """The NodeCache's whole status for these entries."""
        states = [e["state"] for e in entries]
        return {"models": entries, **{s: states.count(s) for s in COUNTED_STATES},
                "bytes": sum(int(e.get("bytes") or 0) for e in entries)}

    async def _write(self, entries: list[Entry]) -> bool:
        status = self.status(entries)
        self.writes += 1
        try:
            if self._exists:
                try:
                    await self.kube.patch_node_cache(self.node, status)
                    return True
                except NotFound:
                    self._exists = False  # deleted under us (by an admin): create it again
            node = self.node_object or {"metadata": {"name": self.node}}
            try:
                await self.kube.create_node_cache(node, status)
            except Conflict:  # created meanwhile: write over it
                await self.kube.patch_node_cache(self.node, status)
            self._exists = True
        except ModelcacheError as e:
            log.warning("nodecache not written; retrying", extra={
                "node": self.node, "error": str(e)})
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
