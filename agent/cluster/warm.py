"""What this node keeps warm: the CachedModels whose ``spec.nodeSelector`` its labels match.

Each one is ensured once (``spec.uri`` + ``spec.include`` + ``spec.verify``, credentials from
the Secret ``spec.credentialsSecret`` in its own namespace) and pinned while any matching
CachedModel says ``spec.pin``. A CachedModel deleted, no longer matching, or no longer pinning
leaves its model unpinned and evictable; nothing is deleted at once. Its entry in this
node's NodeCache is removed.

A failed pull is tried again after the shared backoff (full jitter over a window from
``retry_base`` doubling up to ``retry_max``); an unpinned
model evicted under pressure is pulled again at the next resync, not at once (which would
fight the evictor). At the first reconciliation, pins left by an earlier run for models no
CachedModel pins any more are dropped (in a cluster, CachedModels are the pinning policy,
besides the models the config file pins on every node, which are never unpinned here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.cluster.status import StatusWriter
from agent.index import FAILED, READY, Index, Model
from agent.pull.credentials import CredentialsProvider
from agent.pull.puller import Puller
from agent.settings import ClusterSettings
from common import backoff
from common.errors import ModelcacheError
from common.reference import Reference, credentials_scope, policy_scope, scoped

log = logging.getLogger(__name__)
Obj = dict[str, Any]


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether a ``spec.nodeSelector`` (every key equal; empty: all nodes) picks a node."""
    return all(labels.get(k) == v for k, v in (selector or {}).items())


@dataclass
class _Want:
    """One matching CachedModel and how keeping its model warm went."""

    ref: Reference
    namespace: str
    secret: str | None
    pin: bool
    ensured: Model | None = None
    failures: int = 0
    retry_at: float = 0.0


@dataclass
class Policy:
    """The CachedModels and node labels as the informers last reported them."""

    cms: dict[str, Obj] = field(default_factory=dict)
    labels: dict[str, str] | None = None


class Warm:
    def __init__(self, puller: Puller, index: Index, credentials: CredentialsProvider,
                 status: StatusWriter, settings: ClusterSettings,
                 fixed_pins: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.puller = puller
        self.index = index
        self.credentials = credentials
        self.status = status
        self.settings = settings
        self._clock = clock
        self.policy = Policy()
        self.wants: dict[str, _Want] = {}
        self._pinned: set[str] = set()
        #: pinned in the store at start-up: unpinned at the first reconciliation unless a
        #: CachedModel pins them (pins made after start-up, by the API, are not touched)
        self._pinned_before = {m.key for m in index if m.pinned}
        #: keys of the models the config file pins (``models:`` with ``pin: true``)
        self.fixed_pins = frozenset(fixed_pins)
        self._tracked: set[str] = set()
        self._first = True
        self._dirty = asyncio.Event()
        index.on_change(self._changed)

    # --- inputs --------------------------------------------------------------------------

    def cached_model(self, key: str, obj: Obj | None) -> None:
        if obj is None:
            self.policy.cms.pop(key, None)
        else:
            self.policy.cms[key] = obj
        self._dirty.set()

    def node(self, obj: Obj) -> None:
        labels = dict((obj.get("metadata") or {}).get("labels") or {})
        if labels != self.policy.labels:
            self.policy.labels = labels
            self._dirty.set()

    def _changed(self, model: Model) -> None:
        if any(w.ref.key == model.key for w in self.wants.values()):
            self._dirty.set()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile at every change, at retries and resyncs (call once the informers have
        synced and the start-up delay is over)."""
        while True:
            wake = await self.reconcile()
            timeout = max(0.0, wake - self._clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives as the event is set, and the loop would never stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._dirty.wait()
            self._dirty.clear()

    async def reconcile(self) -> float:
        """Bring pins, pulls and status in line with the policy; return when to look again."""
        now = self._clock()
        wanted, invalid = self._matching()
        for cm_key in self._tracked - set(wanted) - invalid:
            self.wants.pop(cm_key, None)
            self.status.untrack(cm_key)
        self._tracked = set(wanted) | invalid
        for cm_key, want in wanted.items():
            known = self.wants.get(cm_key)
            if known is None or (known.ref, known.secret, known.pin) != (
                    want.ref, want.secret, want.pin):
                self.wants[cm_key] = want
            self.status.track(cm_key, self.policy.cms[cm_key], want.ref.key)
        self.status.known.set()  # what the CachedModels ask of this node is known now
        await self._pins()
        wake = now + self.settings.resync
        for cm_key in sorted(self.wants):
            wake = min(wake, await self._keep(cm_key, self.wants[cm_key], now))
        return wake

    def _matching(self) -> tuple[dict[str, _Want], set[str]]:
        """The CachedModels that select this node, and those among them that are invalid."""
        out: dict[str, _Want] = {}
        invalid: set[str] = set()
        if self.policy.labels is None:
            return out, invalid
        for cm_key, obj in self.policy.cms.items():
            spec = obj.get("spec") or {}
            if not selects(spec.get("nodeSelector"), self.policy.labels):
                continue
            namespace = (obj.get("metadata") or {}).get("namespace", "")
            try:
                verify, secret = spec.get("verify") or None, spec.get("credentialsSecret") or None
                field = "spec.verify"  # each scope checked alone, to name the field at fault
                if verify:
                    policy_scope(namespace or None, verify)
                field = "spec.credentialsSecret"
                if secret:
                    credentials_scope(namespace or None, secret)
                field = "spec.uri"
                ref = scoped(spec.get("uri", ""), spec.get("include"), namespace=namespace or None,
                             credentials=secret, verify=verify)
            except ModelcacheError as e:
                self.status.track(cm_key, obj, "")
                self.status.fail(cm_key, f"{field}: {e}", e.reason)
                invalid.add(cm_key)
                continue
            out[cm_key] = _Want(ref, namespace, spec.get("credentialsSecret") or None,
                                bool(spec.get("pin")))
        return out, invalid

    async def _pins(self) -> None:
        pins = {w.ref.key for w in self.wants.values() if w.pin}
        unpin = self._pinned - pins - self.fixed_pins
        if self._first:  # pins of an earlier run that no CachedModel holds any more
            unpin |= self._pinned_before - pins - self.fixed_pins
            self._first = False
        for key in unpin:
            model = self.index.get(key)
            if model is not None and model.pinned:
                await self.puller.set_pinned(model, False)
                log.info("model unpinned: no CachedModel pins it here", extra={"key": key})
        for key in pins:
            model = self.index.get(key)
            if model is not None and not model.pinned:
                await self.puller.set_pinned(model, True)
        self._pinned = pins

    async def _keep(self, cm_key: str, want: _Want, now: float) -> float:
        """Ensure one CachedModel's model if it needs it; return when to look again."""
        model = self.index.get(want.ref.key)
        if want.ensured is not None and model is want.ensured:
            if model.state != FAILED:
                if model.state == READY:
                    want.failures = 0
                return math.inf
            if not want.retry_at:
                want.failures += 1
                want.retry_at = now + self._backoff(want.failures)
        elif want.ensured is not None and model is None and not want.retry_at:
            want.retry_at = now + self.settings.resync  # evicted: not at once
        if want.retry_at > now:
            return want.retry_at
        want.retry_at = 0.0
        try:
            credentials = None
            if want.secret:
                credentials = await self.credentials.get(want.namespace, want.secret)
            want.ensured = await self.puller.ensure(
                want.ref, credentials=credentials, pin=want.pin, credentials_name=want.secret,
                namespace=want.namespace, count=False)
        except ModelcacheError as e:
            want.failures += 1
            want.retry_at = now + self._backoff(want.failures)
            self.status.fail(cm_key, str(e), e.reason)
            log.warning("cannot keep a CachedModel warm", extra={
                "cachedmodel": cm_key, "key": want.ref.key, "error": str(e)})
            return want.retry_at
        self.status.fail(cm_key, None)
        return math.inf

    def _backoff(self, failures: int) -> float:
        return backoff.delay(failures - 1, self.settings.retry_base, self.settings.retry_max)
