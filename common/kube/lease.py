"""Leader election over a coordination.k8s.io/v1 Lease, as client-go's ``leaderelection``.

Candidates read the Lease every ``retry`` seconds. One that finds it absent creates it; one
that finds it free (no holder) or expired takes it with an update guarded by the
resourceVersion it read, so two candidates never both win. The holder renews it every
``retry`` seconds and stops leading when it has not renewed for ``renew_deadline``
(shorter than ``duration``, so it stops before anyone may take over). Expiry is judged by
the candidate's own clock, from when it last saw the record change (never by comparing
``renewTime`` with a local clock: clocks of nodes differ). On cancellation the holder
releases the Lease (no holder, duration 1 s), so a rolling update hands over at once.

Only a handful of candidates (the webhook's replicas) take part: each reads the Lease once
per ``retry``, so the cost grows with the candidates, never with the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from common.errors import Conflict, ModelcacheError, NotFound

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class LeaseClient(Protocol):
    """What an election needs of ``common.kube.client.KubeClient``."""

    async def get_lease(self, namespace: str, name: str) -> Obj: ...

    async def create_lease(self, namespace: str, body: Obj) -> Obj: ...

    async def replace_lease(self, namespace: str, name: str, body: Obj) -> Obj: ...


@dataclass(frozen=True)
class LeaseSettings:
    duration: float = 15.0
    """Seconds a Lease not renewed stays held (``leaseDurationSeconds``)."""

    renew_deadline: float = 10.0
    """Seconds the holder keeps leading without a successful renewal."""

    retry: float = 2.0
    """Seconds between two attempts to take or renew the Lease."""


def micro_time(at: float | None = None) -> str:
    """A ``MicroTime`` as the apiserver writes it."""
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    def __init__(self, kube: LeaseClient, namespace: str, name: str, identity: str,
                 settings: LeaseSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.settings = settings or LeaseSettings()
        self._clock = clock
        #: set while this candidate holds the Lease
        self.leading = asyncio.Event()
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._lease: Obj | None = None

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Forever: take the Lease, run ``lead`` while holding it (cancelled when the Lease
        is lost), take it again. Releases the Lease when cancelled."""
        try:
            while True:
                await self._acquire()
                log.info("leading", extra={"lease": f"{self.namespace}/{self.name}",
                                           "identity": self.identity})
                task: asyncio.Task[None] = asyncio.create_task(lead(), name=f"lead-{self.name}")
                try:
                    await self._keep(task)
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    self.leading.clear()
                log.warning("no longer leading", extra={"lease": f"{self.namespace}/{self.name}",
                                                        "identity": self.identity})
        finally:
            if self._lease is not None and self._holder(self._lease) == self.identity:
                await self._release()

    async def _acquire(self) -> None:
        while True:
            if await self._try():
                self.leading.set()
                return
            await asyncio.sleep(self.settings.retry * random.uniform(1.0, 1.2))

    async def _keep(self, task: asyncio.Task[None]) -> None:
        """Renew until the Lease is lost or ``lead`` ends."""
        renewed = self._clock()
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.settings.retry)
            if done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("leader's work failed", exc_info=task.exception())
                return
            if await self._try():
                renewed = self._clock()
            elif self._clock() - renewed > self.settings.renew_deadline:
                return

    async def _try(self) -> bool:
        """Take or renew the Lease once; whether this candidate holds it now."""
        now = self._clock()
        try:
            lease = await self.kube.get_lease(self.namespace, self.name)
        except NotFound:
            return await self._write(None, now)
        except ModelcacheError as e:
            log.debug("lease not read", extra={"lease": self.name, "error": str(e)})
            return False
        self._lease = lease
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"),
                  spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.settings.duration)
        if holder and holder != self.identity and self._observed_at + duration > now:
            return False  # held by another, and not expired
        return await self._write(lease, now)

    async def _write(self, lease: Obj | None, now: float) -> bool:
        stamp = micro_time()
        spec: Obj = {"holderIdentity": self.identity,
                     "leaseDurationSeconds": max(1, round(self.settings.duration)),
                     "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}
        try:
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": spec}
                self._lease = await self.kube.create_lease(self.namespace, body)
            else:
                old = lease.get("spec") or {}
                transitions = int(old.get("leaseTransitions") or 0)
                if old.get("holderIdentity") == self.identity:
                    spec["acquireTime"] = old.get("acquireTime") or stamp
                    spec["leaseTransitions"] = transitions
                else:
                    spec["leaseTransitions"] = transitions + 1
                body = {**lease, "spec": {**old, **spec}}
                self._lease = await self.kube.replace_lease(self.namespace, self.name, body)
        except Conflict:
            return False  # another candidate wrote first
        except ModelcacheError as e:
            log.debug("lease not written", extra={"lease": self.name, "error": str(e)})
            return False
        spec = self._lease.get("spec") or {}
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"),
                          spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        self._observed_at = now
        return True

    async def _release(self) -> None:
        """Give the Lease up, if this candidate still holds it (read again: a renewal
        cancelled on its way may have been written without its answer seen)."""
        try:
            lease = await self.kube.get_lease(self.namespace, self.name)
            if self._holder(lease) != self.identity:
                return
            spec = {**(lease.get("spec") or {}), "holderIdentity": None,
                    "leaseDurationSeconds": 1, "renewTime": micro_time()}
            await self.kube.replace_lease(self.namespace, self.name, {**lease, "spec": spec})
            log.info("lease released", extra={"lease": f"{self.namespace}/{self.name}"})
        except ModelcacheError as e:
            log.warning("lease not released; it expires", extra={"lease": self.name,
                                                                 "error": str(e)})

    @staticmethod
    def _holder(lease: Obj) -> str:
        return str((lease.get("spec") or {}).get("holderIdentity") or "")
