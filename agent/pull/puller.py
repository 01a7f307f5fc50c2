"""Pulls: resolve -> fetch -> verify -> publish, once per model however many ask.

``ensure`` is idempotent: a ready model is a hit; a model being pulled is joined; anything
else starts one pull task. A pull writes an intent first (``pulls/<key>.json``) so that after
a crash or a restart it is resumed where its partial downloads stopped. A mutable reference
is resolved again after the refresh interval; a new revision is published as a new tree and
the old one stays for the pods that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from agent.egress import Egress
from agent.fetch.engine import Fetcher, ref_id
from agent.fetch.stats import FetchStats
from agent.index import FAILED, PULLING, READY, Index, Model
from agent.metrics import Metrics
from agent.pull.sharing import SharedAccess
from agent.settings import AgentSettings
from agent.sources.base import Credentials, RemoteFile, Resolved, Source
from agent.store.names import check_unique, safe_relpath
from agent.store.roles import Publisher
from agent.store.trees import FileEntry, Manifest, apply_whiteout
from agent.verify.policy import Policy, PolicyProvider
from agent.verify.signature import verify_files
from common.errors import (
    ModelcacheError,
    NoSpace,
    NotAllowed,
    NotFound,
    PolicyError,
    ShuttingDown,
    Unsigned,
    VerificationFailed,
)
from common.reference import Reference, parse

log = logging.getLogger(__name__)
INTENT_FLUSH_SECONDS = 1.0
LAST_USED_FLUSH_SECONDS = 300.0


class Reserver(Protocol):
    """Holds disk space for a pull while it runs, and makes room when a write runs out of
    it (:class:`agent.eviction.reservations.Reservations`)."""

    def reserve(self, key: str, nbytes: int) -> contextlib.AbstractAsyncContextManager[None]:
        ...

    async def relieve(self, key: str, error: NoSpace) -> None:
        """Out of space mid-write: make room for one more try, or raise :class:`NoSpace`."""
        ...


class _Progress:
    """Bytes of a pull, counted from the fetch threads."""

    def __init__(self, model: Model, metrics: Metrics | None, scheme: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._metric = metrics.pulled_bytes.labels(scheme=scheme) if metrics else None

    def done(self, n: int) -> None:
        with self._lock:
            self.model.bytes_done += n

    def downloaded(self, n: int) -> None:
        if self._metric is not None:
            self._metric.inc(n)


class Puller:
    def __init__(self, *, store: Publisher, fetcher: Fetcher, sources: Mapping[str, Source],
                 index: Index, egress: Egress, settings: AgentSettings,
                 reserver: Reserver, metrics: Metrics | None = None,
                 sharing: SharedAccess | None = None,
                 policies: PolicyProvider | None = None) -> None:
        self.store = store
        self.fetcher = fetcher
        self.sources = dict(sources)
        self.index = index
        self.egress = egress
        self.settings = settings
        self.metrics = metrics
        self.reserver = reserver
        #: the cross-namespace rule (cluster mode); ``None``: one tenant (standalone)
        self.sharing = sharing
        #: signature policies a reference may name (``None``: none can be checked here, so
        #: a reference that names one fails)
        self.policies = policies
        self._stopping = False
        self._last_flush: dict[str, float] = {}

    # --- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Fill the index from the store's manifests (after recovery)."""
        for manifest in self.store.manifests():
            try:
                ref = parse(manifest.uri, manifest.include, manifest.verify,
                            manifest.credentials or "")
            except ModelcacheError:
                log.warning("manifest has an unparsable URI", extra={"key": manifest.key})
                continue
            # a manifest that records its credentials scope tells who pulled it; an older
            # one does not, and the model is checked for each namespace (agent/pull/sharing)
            self.index.add(Model(ref, READY, manifest, manifest.size_bytes,
                                 manifest.size_bytes, pinned=manifest.pinned,
                                 last_used=manifest.last_used or manifest.created,
                                 pulled_with=None if manifest.credentials is None
                                 else pulled_by(ref)))

    async def resume(self, credentials: Any = None) -> list[str]:
        """Start again every pull a crash or a shutdown interrupted."""
        resumed = []
        for key, intent in (await asyncio.to_thread(self.store.intents)).items():
            try:
                ref = parse(intent["uri"], intent.get("include"), intent.get("verify") or "",
                            intent.get("scope") or "")
            except (ModelcacheError, KeyError):
                await asyncio.to_thread(self.store.remove_intent, key)
                continue
            if ref.key != key:
                await asyncio.to_thread(self.store.remove_intent, key)
                continue
            creds = None
            if intent.get("credentials") and credentials is not None:
                with contextlib.suppress(ModelcacheError):
                    creds = await credentials.get(intent.get("namespace"), intent["credentials"])
            try:
                await self.ensure(ref, credentials=creds, pin=bool(intent.get("pin")),
                                  credentials_name=intent.get("credentials"),
                                  namespace=intent.get("namespace"), count=False)
            except PolicyError as e:  # gone or broken since: the pull cannot be checked
                await asyncio.to_thread(self.store.remove_intent, key)
                log.warning("interrupted pull not resumed", extra={"key": key, "error": str(e)})
                continue
            resumed.append(key)
        return resumed

    # --- API -----------------------------------------------------------------------------

    async def ensure(self, ref: Reference, *, credentials: Credentials | None = None,
                     pin: bool = False, credentials_name: str | None = None,
                     namespace: str | None = None, count: bool = True) -> Model:
        """Make sure the model is (or becomes) ready; return its record at once."""
        if self._stopping:
            raise ShuttingDown("the agent is shutting down")
        if not ref.cached:
            raise NotAllowed(f"{ref.scheme}:// references are mounted by the webhook, not cached")
        self.egress.check_scheme(ref.scheme)
        if ref.scheme == "file":
            self.egress.check_path(ref.path)  # refuse at once, not after a failed pull
        policy = await self.policy(ref)  # a missing or broken policy: refused at once
        model = self.index.get(ref.key)
        now = time.time()
        if policy is not None and model is not None and model.state == READY \
                and not self._checked_under(model, policy):
            await self._recheck(model, policy)
        if model is not None and model.state in (READY, PULLING):
            if self.sharing is not None:
                await self.sharing.check(model, self._source(ref.scheme), namespace,
                                         credentials_name, credentials)
            if pin and not model.pinned:
                await self.set_pinned(model, True)
            if model.state == READY:
                model.last_used = now
                await self._flush_last_used(model)
                if count and self.metrics:
                    self.metrics.cache_requests.labels(result="hit").inc()
                    self.metrics.served_bytes.labels(to="pod").inc(model.bytes_total)
                self._maybe_refresh(model, credentials)
            return model
        if count and self.metrics:
            self.metrics.cache_requests.labels(result="miss").inc()
        if model is None:
            model = Model(ref, PULLING, pinned=pin, last_used=now)
            self.index.add(model)
        else:  # failed before: try again
            model.state, model.error, model.bytes_done, model.started = PULLING, None, 0, now
            model.pinned = model.pinned or pin
            self.index.notify(model)
        intent = {"uri": ref.uri, "include": list(ref.include), "verify": ref.verify,
                  "scope": ref.credentials, "pin": model.pinned,
                  "credentials": credentials_name, "namespace": namespace,
                  "started": now, "refs": [], "blobs": [], "requested": count}
        model.intent = intent
        model.pulled_with = (namespace, credentials_name)
        model.task = asyncio.create_task(self._pull(model, credentials, intent, policy=policy),
                                         name=f"pull-{ref.key}")
        return model

    async def policy(self, ref: Reference) -> Policy | None:
        """The signature policy ``ref`` names, loaded now; None if it names none. A policy
        that is missing or malformed raises :class:`PolicyError` (and is counted)."""
        if not ref.verify:
            return None
        try:
            if self.policies is None:
                raise PolicyError(f"verify policy {ref.verify!r}: this agent checks no "
                                  "signatures (no policies configured)")
            return await self.policies.get(ref.verify)
        except PolicyError:
            self._verified("policy")
            raise

    def _checked_under(self, model: Model, policy: Policy) -> bool:
        m = model.manifest
        return m is not None and m.verified is not None \
            and m.verified.policy_digest == policy.digest and m.verified.tree == m.tree

    async def _recheck(self, model: Model, policy: Policy) -> None:
        """The policy changed since the model passed (a rotated key): check the published
        files again, from the store. A failure leaves the model failed and its manifest
        without a passing check, so no pod is handed it from now on."""
        manifest = model.manifest
        assert manifest is not None
        try:
            verification, files = await asyncio.to_thread(
                verify_files, policy, manifest.files, self.store.blobs.path, self.store.tmp,
                model.ref.matches if model.ref.include else None)
        except VerificationFailed as e:
            self._verified(_outcome(e))
            model.manifest = replace(manifest, verified=None)
            await asyncio.to_thread(self.store.update_manifest, model.manifest)
            model.state, model.error, model.error_reason = FAILED, str(e), e.reason
            self.index.notify(model)
            log.warning("model no longer verifies under its policy", extra={
                "key": model.key, "error": str(e)})
            return
        self._verified("passed")
        model.manifest = replace(manifest, files=files, verified=verification)
        await asyncio.to_thread(self.store.update_manifest, model.manifest)
        self.index.notify(model)

    def _verified(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.verifications.labels(result=result).inc()

    async def set_pinned(self, model: Model, pinned: bool) -> None:
        model.pinned = pinned
        if model.manifest is not None:
            model.manifest = replace(model.manifest, pinned=pinned)
            await asyncio.to_thread(self.store.update_manifest, model.manifest)
        self.index.notify(model)

    async def stop(self) -> None:
        """Stop taking work; cancel running pulls (their partial data stays for a resume)."""
        self._stopping = True
        tasks = [m.task for m in self.index if m.task is not None and not m.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the pull ------------------------------------------------------------------------

    async def _pull(self, model: Model, credentials: Credentials | None,
                    intent: dict[str, Any], refresh: bool = False,
                    policy: Policy | None = None) -> None:
        ref = model.ref
        started = time.monotonic()
        held: list[str] = []  # blobs fetched for this pull, held until it is published
        try:
            if policy is None:
                policy = await self.policy(ref)  # refresh: the policy as it is now
            source = self._source(ref.scheme)
            resolved = await source.resolve(ref, credentials)
            if refresh and model.manifest is not None \
                    and resolved.revision == model.manifest.revision:
                model.manifest = replace(model.manifest, resolved_at=time.time())
                await asyncio.to_thread(self.store.update_manifest, model.manifest)
                return
            locator = self._source(parse(resolved.source_uri).scheme) \
                if resolved.source_uri else source
            files = self._select(resolved, policy)
            intent["refs"] = [ref_id(f) for f in files]
            await asyncio.to_thread(self.store.write_intent, ref.key, intent)
            if not refresh:
                model.bytes_total = sum(f.size or 0 for f in files)
            # content the store already has (by the digest the source states) needs no room
            needed = sum(f.size or 0 for f in files
                         if not self.store.knows_stated(f.sha256, f.git_oid))
            if resolved.source_uri and resolved.credentials is not None:
                credentials = resolved.credentials  # the referred-to source's own
            fetched: dict[int, list[FileEntry]] = {}
            async with self.reserver.reserve(ref.key, needed):
                try:
                    entries = await self._fetch_all(model, locator, files, credentials, intent,
                                                    refresh, fetched, held, policy)
                except NoSpace as e:  # out of space mid-write: evict, then one more try
                    await self.reserver.relieve(ref.key, e)
                    entries = await self._fetch_all(model, locator, files, credentials, intent,
                                                    refresh, fetched, held, policy)
            verification = None
            if policy is not None:  # every file verified against the source by now
                verification, checked = await asyncio.to_thread(
                    verify_files, policy, entries, self.store.blobs.path, self.store.tmp,
                    ref.matches if ref.include else None)
                entries = list(checked)
                self._verified("passed")
            now = time.time()
            manifest = Manifest(
                key=ref.key, uri=ref.uri, revision=resolved.revision, tree="",
                files=tuple(entries), include=ref.include, source_uri=resolved.source_uri,
                created=now, last_used=model.last_used or now, resolved_at=now,
                pinned=model.pinned, verify=ref.verify, verified=verification,
                credentials=ref.credentials)
            model.manifest = await asyncio.to_thread(self.store.publish, manifest)
            model.state, model.error = READY, None
            model.bytes_total = model.bytes_done = model.manifest.size_bytes
            await asyncio.to_thread(self.store.remove_intent, ref.key)
            self._observe(ref, "ok", started)
            if intent.get("requested") and self.metrics and not refresh:
                # the caller that missed now gets the model from the cache
                self.metrics.served_bytes.labels(to="pod").inc(model.bytes_total)
            log.info("model ready", extra={
                "key": ref.key, "uri": ref.display, "revision": resolved.revision,
                "files": len(entries), "bytes": model.manifest.size_bytes,
                "seconds": round(time.monotonic() - started, 3),
                **({"verified": verification.signer} if verification else {})})
        except asyncio.CancelledError:
            raise  # shutdown or removal: the intent stays, so the pull resumes later
        except Exception as e:
            error = e if isinstance(e, ModelcacheError) else None
            if error is None:
                log.exception("pull crashed", extra={"key": ref.key})
            if isinstance(e, VerificationFailed):
                self._verified(_outcome(e))
            message = str(e) if error is not None else f"internal error: {type(e).__name__}"
            reason = error.reason if error is not None else "internal"
            await asyncio.to_thread(self.store.remove_intent, ref.key)
            self._observe(ref, "error", started, reason)
            if refresh:
                log.warning("refresh failed; keeping the current revision",
                            extra={"key": ref.key, "error": message})
            else:
                model.state, model.error, model.error_reason = FAILED, message, reason
                log.warning("pull failed", extra={"key": ref.key, "uri": ref.display,
                                                  "error": message})
        finally:
            self.store.release(held)
            model.refreshing = False
            model.intent = None
            self.index.notify(model)

    def _source(self, scheme: str) -> Source:
        self.egress.check_scheme(scheme)
        source = self.sources.get(scheme)
        if source is None:
            raise NotAllowed(f"no source for {scheme}:// is configured on this agent")
        return source

    def _select(self, resolved: Resolved, policy: Policy | None) -> list[RemoteFile]:
        ref = resolved.ref
        files = [f for f in resolved.files
                 if f.unpack or ref.matches(f.path) or _is_signature(f.path, policy)]
        if not files:
            raise NotFound(f"include globs {list(ref.include)} select no file of {ref.display}")
        for f in files:
            safe_relpath(f.path)
        check_unique(f.path for f in files)
        return files  # in the source's order: image layers overlay in that order

    async def _fetch_all(self, model: Model, source: Source, files: list[RemoteFile],
                         credentials: Credentials | None, intent: dict[str, Any],
                         refresh: bool, results: dict[int, list[FileEntry]],
                         held: list[str], policy: Policy | None = None) -> list[FileEntry]:
        """Fetch the files not in ``results`` yet (by index), filling it in; every blob
        fetched is added to ``held`` (held until the pull publishes)."""
        progress = _Progress(model, self.metrics, model.ref.scheme)
        stats = FetchStats(on_download=progress.downloaded)
        limit = asyncio.Semaphore(self.settings.fetch.max_files)
        last_flush = time.monotonic()

        async def one(i: int, f: RemoteFile) -> None:
            nonlocal last_flush
            async with limit:
                entries = await self.fetcher.fetch(source, f, credentials,
                                                   progress.done if not refresh else _ignore,
                                                   stats)
            results[i] = entries
            blobs = [e.blake3 for e in entries if not e.whiteout]
            held.extend(blobs)
            intent["blobs"].extend(blobs)
            if time.monotonic() - last_flush > INTENT_FLUSH_SECONDS:
                last_flush = time.monotonic()
                await asyncio.to_thread(self.store.write_intent, model.key, intent)

        todo = sorted((i for i in range(len(files)) if i not in results),
                      key=lambda i: -(files[i].size or 0))  # biggest first
        tasks = [asyncio.create_task(one(i, files[i])) for i in todo]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.metrics and stats.files_deduplicated:
            self.metrics.dedup_hits.inc(stats.files_deduplicated)
        return self._merge(model.ref, files, results, policy)

    def _merge(self, ref: Reference, files: list[RemoteFile],
               results: dict[int, list[FileEntry]],
               policy: Policy | None = None) -> list[FileEntry]:
        """One entry per path. Members of successive archives (image layers) overlay
        earlier ones, after the layer's whiteouts deleted from them; a plain file listed
        twice is an error."""
        merged: dict[str, FileEntry] = {}
        for i, f in enumerate(files):
            for e in results[i]:
                if e.whiteout:
                    apply_whiteout(merged, e.path)
            for e in results[i]:
                if e.whiteout or (f.unpack and not ref.matches(e.path)
                                  and not _is_signature(e.path, policy)):
                    continue
                merged[e.path] = e
        if not merged:
            raise NotFound(f"include globs {list(ref.include)} select no file of {ref.display}")
        check_unique(merged)
        return [merged[p] for p in sorted(merged)]

    # --- refresh and last use ------------------------------------------------------------

    def _maybe_refresh(self, model: Model, credentials: Credentials | None) -> None:
        """Re-resolve a mutable reference in the background once the interval is over."""
        m = model.manifest
        if m is None or model.ref.immutable or model.refreshing or self._stopping:
            return
        if time.time() - (m.resolved_at or m.created) < self.settings.refresh_interval:
            return
        model.refreshing = True
        model.intent = intent = {"uri": model.ref.uri, "include": list(model.ref.include),
                                 "verify": model.ref.verify, "scope": model.ref.credentials,
                                 "pin": model.pinned,
                                 "started": time.time(), "refs": [], "blobs": []}
        model.task = asyncio.create_task(self._pull(model, credentials, intent, refresh=True),
                                         name=f"refresh-{model.key}")

    def refresh_due(self) -> None:
        """Start the refreshes that are due (called periodically)."""
        for model in self.index:
            if model.state == READY:
                self._maybe_refresh(model, None)

    async def _flush_last_used(self, model: Model) -> None:
        m = model.manifest
        if m is None:
            return
        now = time.monotonic()
        if now - self._last_flush.get(model.key, 0.0) < LAST_USED_FLUSH_SECONDS:
            return
        self._last_flush[model.key] = now
        model.manifest = replace(m, last_used=model.last_used)
        await asyncio.to_thread(self.store.update_manifest, model.manifest)

    def _observe(self, ref: Reference, result: str, started: float, reason: str = "") -> None:
        if self.metrics is None:
            return
        self.metrics.pull_duration.labels(scheme=ref.scheme, result=result).observe(
            time.monotonic() - started)
        if reason:
            self.metrics.pull_failures.labels(reason=reason).inc()


def pulled_by(ref: Reference) -> tuple[str | None, str | None]:
    """Who pulled a model, from its reference's credentials scope: (namespace, Secret), or
    (None, None) for a pull without credentials."""
    if not ref.credentials:
        return None, None
    namespace, _, name = ref.credentials.rpartition("/")
    return namespace or None, name


def _ignore(n: int) -> None:
    return None


def _is_signature(path: str, policy: Policy | None) -> bool:
    """The policy's signature file is fetched whatever the include globs select."""
    return policy is not None and path.removeprefix("./") == policy.signature


def _outcome(e: VerificationFailed) -> str:
    """The verifications metric's result for a failed check."""
    return "unsigned" if isinstance(e, Unsigned) else "failed"
