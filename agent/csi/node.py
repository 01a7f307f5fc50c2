"""The CSI node's core: publish a model at a target path, unpublish it, recover after a restart.

``publish``: authenticate the pod (:mod:`agent.csi.access`), ensure the model for the pod's
namespace and credentials (``Puller.ensure``: a hit when warm, a pull otherwise, shared with
every other caller), wait a bounded time for it, let :func:`agent.csi.access.admit` decide,
then hold the model in use, record the publish durably and bind-mount the model's current
tree read-only at the target (the pod sees exactly its model's files). A model not ready in
time raises :class:`NotReady` with its progress; kubelet asks again.

``unpublish``: unmount, remove the target, drop the record, release the hold. Both are
idempotent, one volume at a time (a lock per volume id).

``recover`` (at start-up, before anything may evict): every record whose target is still in
the kernel's mount table holds its model in use again; the others are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agent.csi import mounts
from agent.csi.access import Access, Pod, admit
from agent.csi.progress import Watch, not_ready_message
from agent.csi.records import Record, Records
from agent.csi.requests import Publish, Unpublish
from agent.eviction.usage import Usage
from agent.index import PULLING, READY, Index, Model
from agent.metrics import Metrics
from agent.pagecache.warmer import PageCacheWarmer
from agent.pull.credentials import CredentialsProvider
from agent.pull.puller import Puller
from agent.settings import CsiSettings
from agent.store.local import Store
from common.errors import Conflict, InvalidInput, NotReady, StoreError
from common.reference import Reference

log = logging.getLogger(__name__)
MAX_ATTEMPTS_REMEMBERED = 10_000


class CsiNode:
    def __init__(self, *, settings: CsiSettings, store: Store, index: Index, puller: Puller,
                 usage: Usage, credentials: CredentialsProvider, access: Access,
                 metrics: Metrics, warmer: PageCacheWarmer | None = None) -> None:
        self.settings = settings
        self.warmer = warmer
        self.store = store
        self.index = index
        self.puller = puller
        self.usage = usage
        self.credentials = credentials
        self.access = access
        self.metrics = metrics
        self.records = Records(store.root)
        self.pods_dir = settings.kubelet_dir / "pods"
        self._locks: dict[str, _VolumeLock] = {}
        self._attempts: dict[str, _Attempts] = {}
        """Publishes asked for and not done yet, by volume id."""

    # --- start-up ------------------------------------------------------------------------

    async def recover(self) -> None:
        """Hold what is still mounted; forget publishes whose mount is gone."""
        records = await asyncio.to_thread(self.records.load)
        table = await asyncio.to_thread(mounts.mount_table)
        kept, dropped = 0, 0
        for record in records:
            if mounts.mounted_at(Path(record.target), table):
                self.usage.hold(record.holder, record.key)
                kept += 1
            else:
                await asyncio.to_thread(self.records.remove, record.volume_id)
                dropped += 1
        self._count()
        log.info("CSI publishes recovered", extra={"mounted": kept, "dropped": dropped})

    # --- publish -------------------------------------------------------------------------

    async def publish(self, req: Publish) -> None:
        attempts = self._attempt(req.volume_id)
        pod = await self.access.authenticate(req.pod)
        async with self._volume(req.volume_id):
            if await self._already_published(req):
                return
            ref = req.reference(pod.namespace)
            model = await self._ready(req, ref, pod, attempts)
            admit(pod, model, ref.verify)
            await self._mount(req, pod, model)
        if self._attempts.pop(req.volume_id, None) is attempts:
            self.metrics.csi_publish_wait.observe(time.monotonic() - attempts.started)

    async def _already_published(self, req: Publish) -> bool:
        """True if this very publish is in place; a record whose mount is gone is forgotten."""
        record = self.records.get(req.volume_id)
        if record is None:
            return False
        table = await asyncio.to_thread(mounts.mount_table)
        if not mounts.mounted_at(Path(record.target), table):
            await asyncio.to_thread(self.records.remove, record.volume_id)
            self.usage.release(record.holder, record.key)
            return False
        if record.target != str(req.target):
            raise Conflict(f"volume {req.volume_id} is already published at {record.target}")
        asked = Record(req.volume_id, str(req.target), record.key, record.tree, req.uri,
                       req.ref.include, req.credentials, verify=req.verify)
        if not record.same_request(asked):
            raise Conflict(f"volume {req.volume_id} is already published at {record.target} "
                           "with other volume attributes")
        return True

    async def _ready(self, req: Publish, ref: Reference, pod: Pod, attempts: _Attempts
                     ) -> Model:
        """The model, ready, for the pod's namespace and credentials; or NotReady."""
        credentials = None
        if req.credentials is not None:
            credentials = await self.credentials.get(pod.namespace, req.credentials)
        # one cache request per volume (a hit, or a miss), however often kubelet asks
        model = await self.puller.ensure(ref, credentials=credentials,
                                         credentials_name=req.credentials,
                                         namespace=pod.namespace, count=not attempts.counted)
        if not attempts.counted and self.warmer is not None:
            # the pod's image is being pulled meanwhile: read its model into the page cache
            self.warmer.want(model.key, pod=pod.key or req.pod.key, trigger="csi")
        attempts.counted = True
        watch = Watch(model)
        if model.state == PULLING:
            model = await self.index.wait(model.key, self.settings.publish_wait) or model
        if model.state != READY:
            raise NotReady(not_ready_message(model, watch.rate(model)))
        return model

    async def _mount(self, req: Publish, pod: Pod, model: Model) -> None:
        assert model.manifest is not None  # admit() saw it ready
        record = Record(
            volume_id=req.volume_id, target=str(req.target), key=model.key,
            tree=model.manifest.tree, uri=req.uri, include=req.ref.include,
            credentials=req.credentials, verify=req.verify, namespace=pod.namespace,
            pod=req.pod.key, pod_uid=req.pod.uid, published=time.time())
        # in use from now on, in the same step as the check that it is still there: an
        # eviction takes a model out of the index before it touches the disk
        self.usage.hold(record.holder, model.key)
        if self.index.get(model.key) is not model:
            self.usage.release(record.holder, model.key)
            raise NotReady(f"model {model.key} was evicted meanwhile; it is pulled again at "
                           "the next attempt")
        tree = self.store.trees.model_dir(model.key) / record.tree
        try:
            await asyncio.to_thread(_make_target, req.target)
            await asyncio.to_thread(self.records.put, record)
            await asyncio.to_thread(mounts.bind_read_only, tree, req.target)
        except BaseException:
            self.usage.release(record.holder, model.key)
            with contextlib.suppress(StoreError):
                await asyncio.shield(asyncio.to_thread(self.records.remove, req.volume_id))
            raise
        self._count()
        log.info("volume published", extra={
            "volume": req.volume_id, "key": model.key, "uri": model.ref.display,
            "tree": record.tree, "pod": record.pod})

    # --- unpublish -----------------------------------------------------------------------

    async def unpublish(self, req: Unpublish) -> None:
        async with self._volume(req.volume_id):
            record = self.records.get(req.volume_id)
            ours = record is not None and record.target == str(req.target)
            await asyncio.to_thread(self._unmount, req.target, ours)
            if record is not None and ours:
                await asyncio.to_thread(self.records.remove, req.volume_id)
                self.usage.release(record.holder, record.key)
                log.info("volume unpublished", extra={
                    "volume": req.volume_id, "key": record.key, "pod": record.pod})
        self._attempts.pop(req.volume_id, None)
        self._count()

    def _unmount(self, target: Path, ours: bool) -> None:
        """Unmount the target (each mount stacked there), then remove the directory."""
        while True:
            table = mounts.mount_table()
            found = mounts.mounted_at(target, table)
            if not found:
                break
            if not ours and not self._of_store(found[-1], table):
                raise Conflict(f"{target} is a mount modelcache did not make; not unmounted")
            mounts.unmount(target)
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Conflict(f"target path {target} is not empty and not a mount of "
                               "modelcache's; left as it is") from e
            raise StoreError(f"cannot remove the target path {target}: {e.strerror}") from e

    def _of_store(self, mount: mounts.Mount, table: list[mounts.Mount]) -> bool:
        source = mounts.bind_source(mount, table)
        return source is not None and source.is_relative_to(self.store.models)

    # --- helpers -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _volume(self, volume_id: str) -> AsyncIterator[None]:
        """One operation at a time per volume (kubelet may retry while one still waits)."""
        entry = self._locks.setdefault(volume_id, _VolumeLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[volume_id]

    def _attempt(self, volume_id: str) -> _Attempts:
        attempts = self._attempts.get(volume_id)
        if attempts is None:
            if len(self._attempts) >= MAX_ATTEMPTS_REMEMBERED:  # never published: forgotten
                oldest = min(self._attempts, key=lambda v: self._attempts[v].started)
                del self._attempts[oldest]
            attempts = self._attempts[volume_id] = _Attempts(time.monotonic())
        return attempts

    def _count(self) -> None:
        self.metrics.csi_volumes.set(len(self.records))


@dataclass
class _Attempts:
    """kubelet's attempts at one publish so far."""

    started: float
    """When it first asked: what the pod waits is counted from there."""
    counted: bool = False
    """Whether the cache request (hit or miss) was counted."""


class _VolumeLock:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _make_target(target: Path) -> None:
    """The target directory (kubelet made its parent)."""
    try:
        target.mkdir(mode=0o750)
    except FileExistsError:
        if not target.is_dir() or target.is_symlink():
            raise InvalidInput(f"target path {target} exists and is not a directory") from None
    except FileNotFoundError:
        raise InvalidInput(f"the parent of target path {target} does not exist") from None
