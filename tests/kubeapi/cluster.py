"""The state of the fake cluster: objects, one global resourceVersion, an event log, watches.

Every write takes the next resourceVersion (as etcd's revision does) and appends a change to
a bounded log. Watches replay the log from the resourceVersion they ask for, then follow it
live; a resourceVersion older than the log's window gets ``410 Expired``. Selectors are
applied to the object before and after each change, so an object that stops matching is
seen as DELETED by that watch and one that starts matching as ADDED, as the watch cache
does. A write that changes nothing is not a write (no new resourceVersion, no event).

Everything here is synchronous: tests may call it directly to act as a controller, kubelet
or admin would, without going through HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import copy
import json
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.kubeapi import patch as patches
from tests.kubeapi.auth import Auth
from tests.kubeapi.errors import (
    already_exists,
    bad_request,
    conflict,
    expired,
    invalid,
    not_found,
    server_not_found,
    timeout,
)
from tests.kubeapi.resources import BUILTINS, ResourceType, check, field_value, require_kind
from tests.kubeapi.resources import from_crd as resource_from_crd
from tests.kubeapi.selectors import (
    FieldTerm,
    Requirement,
    fields_match,
    labels_match,
    parse_fields,
    parse_labels,
)

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    bucket: str
    old: JSON | None
    new: JSON  # for DELETED: the object as it was deleted, carrying the deletion's rv


@dataclass
class Watch:
    """One open watch: what it selects and the queue its HTTP stream drains."""

    rt: ResourceType
    namespace: str
    labels: list[Requirement]
    fields: list[FieldTerm]
    bookmarks: bool
    user: str = ""
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)

    def selects(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace and meta.get("namespace", "") != self.namespace:
            return False
        return labels_match(self.labels, meta.get("labels")) and fields_match(
            self.fields, lambda f: field_value(obj, self.rt.stored_field(f))
        )

    def offer(self, change: Change, render: Any) -> None:
        """Queue what this watch sees of a change (the watch cache's rules: an object that
        leaves the selection is DELETED, shown as it was before, at the change's version)."""
        if change.bucket != self.rt.key:
            return
        was = self.selects(change.old)
        now_ = change.type != "DELETED" and self.selects(change.new)
        if now_:
            kind, obj = ("MODIFIED" if was else "ADDED"), change.new
        elif was:
            assert change.old is not None
            kind, obj = "DELETED", copy.deepcopy(change.old)
            obj["metadata"]["resourceVersion"] = str(change.rv)
        else:
            return
        self.queue.put_nowait(("event", {"type": kind, "object": render(self.rt, obj)}))


class Cluster:
    """All objects of the fake cluster and the hooks tests use to act on them."""

    def __init__(self, crds: Iterable[JSON] = (), history: int = 1000) -> None:
        self.auth = Auth()
        self.types: list[ResourceType] = list(BUILTINS)
        for crd in crds:
            self.types.append(resource_from_crd(crd))
        self.objects: dict[str, dict[Key, JSON]] = {rt.key: {} for rt in self.types}
        self.rv = 0
        #: changes after ``compacted`` (resourceVersions up to it are gone)
        self.log: deque[Change] = deque()
        self.history = history
        self.compacted = 0
        self.watches: list[Watch] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._expire_next = 0
        #: requests served, by (verb, path) and by (verb, resource) (``group/plural`` or plural)
        self.requests: Counter[tuple[str, str]] = Counter()
        for ns in DEFAULT_NAMESPACES:
            self.create("namespaces", {"metadata": {"name": ns}})

    # --- types ---------------------------------------------------------------------------

    def install_crd(self, crd: JSON) -> None:
        """Apply a new release of a CRD already served (an upgrade): its objects stay as
        stored, and are read, validated and pruned by the new schema from now on (the
        watches open on it end cleanly)."""
        new = resource_from_crd(crd)
        found = [i for i, rt in enumerate(self.types)
                 if (rt.group, rt.plural, rt.builtin) == (new.group, new.plural, False)]
        if not found:
            raise KeyError(f"{new.plural}.{new.group}: no such CRD installed")
        for i in found:
            self.types[i] = new
        # the apiserver serves the new CRD from a new storage and ends the watches of the
        # old one: informers watch again, and see objects as the new schema reads them
        self.break_watches(f"{new.group}/{new.plural}", clean=True)

    def resource(self, name: str | ResourceType) -> ResourceType:
        """A type by ``plural``, ``plural.group`` or ``group/plural`` (core types first)."""
        if isinstance(name, ResourceType):
            return name
        group: str | None = None
        plural = name
        if "/" in name:
            group, plural = name.split("/", 1)
        elif "." in name:
            plural, group = name.split(".", 1)
        found = [rt for rt in self.types
                 if rt.plural == plural and (group is None or rt.group == group)]
        if not found:
            raise KeyError(name)
        return min(found, key=lambda rt: rt.group != "")

    def lookup(self, group: str, version: str, plural: str) -> ResourceType:
        for rt in self.types:
            if (rt.group, rt.version, rt.plural) == (group, version, plural):
                return rt
        raise server_not_found()

    # --- rendering -----------------------------------------------------------------------

    @staticmethod
    def render(rt: ResourceType, stored: JSON, item: bool = False) -> JSON:
        obj = copy.deepcopy(stored)
        if rt.from_storage is not None:
            obj = rt.from_storage(obj)
        if item and rt.builtin:
            return obj  # list items of built-in types carry no kind/apiVersion
        return {"kind": rt.kind, "apiVersion": rt.api_version, **obj}

    # --- reads ---------------------------------------------------------------------------

    def get(self, resource: str | ResourceType, name: str, namespace: str = "") -> JSON:
        rt = self.resource(resource)
        stored = self.objects[rt.key].get(self._key(rt, namespace, name))
        if stored is None:
            raise not_found(rt.group, rt.plural, name)
        return self.render(rt, stored)

    def exists(self, resource: str | ResourceType, name: str, namespace: str = "") -> bool:
        rt = self.resource(resource)
        return self._key(rt, namespace, name) in self.objects[rt.key]

    def list(
        self,
        resource: str | ResourceType,
        namespace: str = "",
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int = 0,
        continue_: str | None = None,
        resource_version: str | None = None,
        resource_version_match: str | None = None,
    ) -> JSON:
        """A list (one page of it with ``limit``) at the current resourceVersion, or at
        exactly ``resource_version`` with ``resource_version_match="Exact"``; pages after the
        first come from the same snapshot, as etcd serves them."""
        rt = self.resource(resource)
        labels = parse_labels(label_selector)
        fields = parse_fields(field_selector, rt.supports_field)
        probe = Watch(rt, namespace, labels, fields, bookmarks=False)
        start = ""
        if continue_:
            at, start = self._decode_continue(continue_)
            snapshot = self._snapshot(rt, at)
        elif resource_version_match == "Exact":
            at = _parse_rv(resource_version)
            if at > self.rv:
                raise timeout(f"Too large resource version: {at}, current: {self.rv}")
            snapshot = self._snapshot(rt, at, continuing=False)
        else:
            if resource_version not in (None, "", "0") and _parse_rv(resource_version) > self.rv:
                raise timeout(
                    f"Too large resource version: {resource_version}, current: {self.rv}"
                )
            at, snapshot = self.rv, self.objects[rt.key]
        keys = sorted(k for k in snapshot if k > _unkey(start) and probe.selects(snapshot[k]))
        meta: JSON = {"resourceVersion": str(at)}
        if limit and len(keys) > limit:
            meta["continue"] = self._encode_continue(at, keys[limit - 1])
            meta["remainingItemCount"] = len(keys) - limit
            keys = keys[:limit]
        items = [self.render(rt, snapshot[k], item=True) for k in keys]
        return {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta,
                "items": items}

    def _snapshot(self, rt: ResourceType, at: int, continuing: bool = True) -> dict[Key, JSON]:
        """The objects of a type as they were at resourceVersion ``at``, from the log."""
        if at < self.compacted and not continuing:
            raise expired(f"too old resource version: {at} ({self.compacted + 1})")
        if at < self.compacted:
            raise expired(
                "The provided continue parameter is too old to display a consistent list "
                "result. You can start a new list without the continue parameter, or use the "
                "continue token in this response to retrieve the remainder of the results. "
                "Continuing with the provided token results in an inconsistent list - objects "
                "that were created, modified, or deleted between the time the first chunk was "
                "returned and now may show up in the list."
            )
        objs = dict(self.objects[rt.key])
        for change in reversed(self.log):
            if change.rv <= at:
                break
            if change.bucket == rt.key:
                key = _obj_key(change.new)
                if change.old is None:
                    objs.pop(key, None)
                else:
                    objs[key] = change.old
        return objs

    @staticmethod
    def _encode_continue(rv: int, key: Key) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(key) + "\x00"})
        return base64.urlsafe_b64encode(raw.encode()).decode()

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, str]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            return int(data["rv"]), str(data["start"])
        except (ValueError, KeyError, TypeError) as e:
            raise bad_request(f"continue key is not valid: {e}") from e

    # --- writes --------------------------------------------------------------------------

    def create(
        self,
        resource: str | ResourceType,
        body: JSON,
        namespace: str = "",
        dry_run: bool = False,
    ) -> JSON:
        rt = self.resource(resource)
        obj, meta = _decoded(rt, copy.deepcopy(body))
        namespace = namespace or (meta.get("namespace", "") if rt.namespaced else "")
        self._check_namespace(rt, meta, namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choice(_NAME_CHARS) for _ in range(5)
            )
        if rt.to_storage is not None:
            obj = rt.to_storage(obj)
            meta = obj["metadata"]
        if rt.schema is not None:
            obj = rt.schema.prune_and_default(obj)
            meta = obj["metadata"]
        for server_field in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp",
                             "deletionGracePeriodSeconds", "generation", "managedFields",
                             "selfLink"):
            meta.pop(server_field, None)
        self._prepare_create(rt, obj)
        check(rt, obj, None)
        key = self._key(rt, namespace, meta["name"])
        if key in self.objects[rt.key]:
            raise already_exists(rt.group, rt.plural, meta["name"])
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if "spec" in obj or not rt.builtin:
            meta["generation"] = 1
        if dry_run:
            return self.render(rt, obj)
        self._write(rt, "ADDED", None, obj)
        return self.render(rt, obj)

    def _prepare_create(self, rt: ResourceType, obj: JSON) -> None:
        """Registry strategies' PrepareForCreate: what the server sets or drops."""
        if "status" in rt.subresources and not rt.builtin:
            obj.pop("status", None)
        if rt.key == "pods":
            obj["status"] = {"phase": "Pending"}
        if rt.key == "namespaces":
            name = obj["metadata"].get("name", "")
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}

    def update(
        self,
        resource: str | ResourceType,
        name: str,
        body: JSON,
        namespace: str = "",
        subresource: str = "",
        dry_run: bool = False,
    ) -> JSON:
        """PUT: replace the object (or its status); a stale resourceVersion is a 409."""
        rt = self.resource(resource)
        obj, meta = _decoded(rt, copy.deepcopy(body))
        _check_url_name(meta, name)
        namespace = namespace or (meta.get("namespace", "") if rt.namespaced else "")
        self._check_namespace(rt, meta, namespace)
        old = self.objects[rt.key].get(self._key(rt, namespace, name))
        if old is None:
            if rt.create_on_update and not subresource:
                return self.create(rt, body, namespace, dry_run)
            raise not_found(rt.group, rt.plural, name)
        if rt.to_storage is not None:
            obj = rt.to_storage(obj)
        return self._update(rt, old, obj, subresource, dry_run)

    def patch(
        self,
        resource: str | ResourceType,
        name: str,
        body: Any,
        namespace: str = "",
        content_type: str = patches.MERGE,
        subresource: str = "",
        dry_run: bool = False,
    ) -> JSON:
        """PATCH with one of the three JSON patch types; a stale resourceVersion in it is a 409."""
        rt = self.resource(resource)
        old = self.objects[rt.key].get(self._key(rt, namespace, name))
        if old is None:
            raise not_found(rt.group, rt.plural, name)
        current = self.render(rt, old)
        patched = patches.apply(content_type, current, body, strategic_allowed=rt.builtin)
        if not isinstance(patched, dict):
            raise bad_request("the patch produced something that is not an object")
        patched, meta = _decoded(rt, patched)
        _check_url_name(meta, name)
        if rt.namespaced and meta.get("namespace") != namespace:
            raise bad_request("the namespace of the provided object does not match the namespace "
                              "sent on the request")
        if rt.to_storage is not None:
            patched = rt.to_storage(patched)
        return self._update(rt, old, patched, subresource, dry_run)

    def _update(
        self, rt: ResourceType, old: JSON, obj: JSON, subresource: str, dry_run: bool
    ) -> JSON:
        meta = obj.setdefault("metadata", {})
        old_meta = old["metadata"]
        name = old_meta["name"]
        if subresource and subresource not in rt.subresources:
            raise server_not_found()
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv not in (None, "") and wanted_rv != old_meta["resourceVersion"]:
            raise conflict(rt.group, rt.plural, name)
        if meta.get("uid") not in (None, "") and meta["uid"] != old_meta["uid"]:
            raise conflict(
                rt.group, rt.plural, name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                f"{old_meta['uid']}",
            )
        obj = self._prepare_update(rt, old, obj, subresource)
        meta = obj["metadata"]
        for kept in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                     "deletionGracePeriodSeconds", "generation", "resourceVersion"):
            if kept in old_meta:
                meta[kept] = old_meta[kept]
            else:
                meta.pop(kept, None)
        meta.pop("managedFields", None)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise invalid(rt.group, rt.kind, name, [(
                    "metadata.finalizers", "FieldValueForbidden",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                )])
        if rt.schema is not None:
            obj = rt.schema.prune_and_default(obj)
            meta = obj["metadata"]
        check(rt, obj, old)
        if obj == old:
            return self.render(rt, old)  # nothing changed: no write, no event
        if "generation" in old_meta and _spec_of(obj) != _spec_of(old):
            meta["generation"] = old_meta["generation"] + 1
        if dry_run:
            return self.render(rt, obj)
        if (old_meta.get("deletionTimestamp") and not meta.get("finalizers")
                and not old_meta.get("deletionGracePeriodSeconds")):
            return self._remove(rt, obj)
        self._write(rt, "MODIFIED", old, obj)
        return self.render(rt, obj)

    @staticmethod
    def _prepare_update(rt: ResourceType, old: JSON, obj: JSON, subresource: str) -> JSON:
        """PrepareForUpdate of the main resource and of its status subresource."""
        if subresource == "status":
            if not rt.builtin:
                # a custom resource's status endpoint changes status and nothing else
                out = copy.deepcopy(old)
                out.pop("status", None)
                if "status" in obj:
                    out["status"] = obj["status"]
                return out
            out = dict(obj)
            if "spec" in old:
                out["spec"] = copy.deepcopy(old["spec"])
            else:
                out.pop("spec", None)
            return out
        if "status" in rt.subresources:
            out = dict(obj)
            if "status" in old:
                out["status"] = copy.deepcopy(old["status"])
            else:
                out.pop("status", None)
            return out
        return obj

    def delete(
        self,
        resource: str | ResourceType,
        name: str,
        namespace: str = "",
        options: JSON | None = None,
        dry_run: bool = False,
    ) -> JSON:
        """DELETE: graceful for pods on a node, deferred by finalizers, else immediate."""
        rt = self.resource(resource)
        options = options or {}
        old = self.objects[rt.key].get(self._key(rt, namespace, name))
        if old is None:
            raise not_found(rt.group, rt.plural, name)
        meta = old["metadata"]
        pre = options.get("preconditions") or {}
        for field_, shown in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(field_) and pre[field_] != meta.get(field_):
                raise conflict(
                    rt.group, rt.plural, name,
                    f"Precondition failed: {shown} in precondition: {pre[field_]}, {shown} in "
                    f"object meta: {meta.get(field_)}",
                )
        if dry_run:
            return self.render(rt, old)
        grace = self._grace_period(rt, old, options)
        if options.get("propagationPolicy") == "Orphan":
            self._collect_garbage(meta["uid"], orphan=True)
            old = self.objects[rt.key][self._key(rt, namespace, name)]
        if grace == 0 and not meta.get("finalizers"):
            return self._remove(rt, old)
        if meta.get("deletionTimestamp") and grace >= meta.get("deletionGracePeriodSeconds", 0):
            return self.render(rt, old)  # already terminating, no sooner than asked
        obj = copy.deepcopy(old)
        obj["metadata"]["deletionTimestamp"] = (
            datetime.now(UTC) + timedelta(seconds=grace)
        ).strftime("%Y-%m-%dT%H:%M:%SZ")
        obj["metadata"]["deletionGracePeriodSeconds"] = grace
        self._write(rt, "MODIFIED", old, obj)
        return self.render(rt, obj)

    def delete_collection(
        self,
        resource: str | ResourceType,
        namespace: str = "",
        label_selector: str | None = None,
        field_selector: str | None = None,
        options: JSON | None = None,
        dry_run: bool = False,
    ) -> JSON:
        """DELETE on a collection: each selected object as by ``delete``; the list of them."""
        rt = self.resource(resource)
        selected = self.list(rt, namespace, label_selector, field_selector)
        items = []
        for item in selected["items"]:
            meta = item["metadata"]
            out = self.delete(rt, meta["name"], meta.get("namespace", ""), options, dry_run)
            items.append(out if out.get("kind") != "Status" else item)
        return {**selected, "items": items}

    @staticmethod
    def _grace_period(rt: ResourceType, obj: JSON, options: JSON) -> int:
        if rt.key != "pods":
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0  # never ran or already finished: no kubelet to wait for
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return max(int(grace), 0)

    def _remove(self, rt: ResourceType, obj: JSON) -> JSON:
        meta = obj["metadata"]
        if rt.key == "namespaces":
            buckets = {t.key: t for t in reversed(self.types) if t.namespaced and not t.virtual}
            for other in buckets.values():
                for key in sorted(k for k in self.objects[other.key] if k[0] == meta["name"]):
                    self._remove(other, self.objects[other.key][key])
        # the change holds the stored object (what etcd deletes): after an update that drops
        # the last finalizer, watchers still see the finalizers, as on a real server
        old = self.objects[rt.key][_obj_key(obj)]
        self._write(rt, "DELETED", old, copy.deepcopy(old))
        self._collect_garbage(meta["uid"])
        if rt.returns_deleted or rt.key == "namespaces":
            return self.render(rt, obj)
        details: JSON = {"name": meta["name"], "kind": rt.plural, "uid": meta["uid"]}
        if rt.group:
            details["group"] = rt.group
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": details}

    def _collect_garbage(self, owner_uid: str, orphan: bool = False) -> None:
        """What kube-controller-manager's garbage collector does once an owner is gone
        (background propagation): a dependent none of whose owners exists any more is
        deleted; one that still has an owner loses the reference to the gone one; with
        ``orphan`` (``propagationPolicy: Orphan``) dependents only lose the reference."""
        alive = {o["metadata"]["uid"] for bucket in self.objects.values() for o in bucket.values()}
        for rt in self.types:
            for stored in list(self.objects[rt.key].values()):
                refs = stored["metadata"].get("ownerReferences") or []
                if not any(r.get("uid") == owner_uid for r in refs):
                    continue
                meta = stored["metadata"]
                if rt.key == "events" and rt.group:
                    continue  # one bucket, two types: handled with the core type
                left = [r for r in refs if r.get("uid") in alive]
                if left or orphan:
                    kept = [r for r in refs if r.get("uid") != owner_uid]
                    self.patch(rt, meta["name"], {"metadata": {"ownerReferences": kept or None}},
                               meta.get("namespace", ""))
                elif self._key(rt, meta.get("namespace", ""), meta["name"]) in \
                        self.objects[rt.key]:
                    self.delete(rt, meta["name"], meta.get("namespace", ""))

    def _write(self, rt: ResourceType, kind: str, old: JSON | None, new: JSON) -> None:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        bucket = self.objects[rt.key]
        if kind == "DELETED":
            del bucket[_obj_key(new)]
        else:
            bucket[_obj_key(new)] = new
        change = Change(self.rv, kind, rt.key, old, new)
        self.log.append(change)
        while len(self.log) > self.history:
            self.compacted = self.log.popleft().rv
        for w in self.watches:
            w.offer(change, self.render)
        self._notify()

    # --- kubelet and controllers ---------------------------------------------------------

    def finish_pod_deletion(self, name: str, namespace: str) -> JSON:
        """What the kubelet does once a terminating pod's containers have stopped."""
        return self.delete("pods", name, namespace, {"gracePeriodSeconds": 0})

    def set_status(
        self, resource: str | ResourceType, name: str, status: JSON, namespace: str = ""
    ) -> JSON:
        """Merge ``status`` into an object's status, as its controller would."""
        return self.patch(resource, name, {"status": status}, namespace, subresource="status")

    # --- watches -------------------------------------------------------------------------

    def watch(
        self,
        resource: str | ResourceType,
        namespace: str = "",
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        bookmarks: bool = False,
        send_initial_events: bool = False,
        user: str = "",
    ) -> Watch:
        """Open a watch; its queue already holds the replayed events (or a 410 ERROR)."""
        rt = self.resource(resource)
        w = Watch(rt, namespace, parse_labels(label_selector),
                  parse_fields(field_selector, rt.supports_field), bookmarks, user)
        if self._expire_next > 0:
            self._expire_next -= 1
            self._expire(w, _parse_rv(resource_version or "0"))
            return w
        if resource_version in (None, "", "0") or send_initial_events:
            if resource_version not in (None, "", "0"):
                since = _parse_rv(resource_version)
                if since > self.rv:
                    raise timeout(f"Too large resource version: {since}, current: {self.rv}")
            bucket = self.objects[rt.key]
            for key in sorted(bucket):
                if w.selects(bucket[key]):
                    w.queue.put_nowait(
                        ("event", {"type": "ADDED", "object": self.render(rt, bucket[key])})
                    )
            if send_initial_events:
                w.queue.put_nowait(("bookmark", {"k8s.io/initial-events-end": "true"}))
        else:
            since = _parse_rv(resource_version)
            if since < self.compacted:
                self._expire(w, since)
                return w
            for change in self.log:
                if change.rv > since:
                    w.offer(change, self.render)
        self.watches.append(w)
        self._notify()
        return w

    def _expire(self, w: Watch, since: int) -> None:
        status = expired(f"too old resource version: {since} ({self.compacted + 1})").status()
        w.queue.put_nowait(("event", {"type": "ERROR", "object": status}))
        w.queue.put_nowait(("end", None))

    def unwatch(self, w: Watch) -> None:
        if w in self.watches:
            self.watches.remove(w)
            self._notify()

    def bookmark(self, w: Watch, annotations: JSON | None = None) -> JSON:
        meta: JSON = {"resourceVersion": str(self.rv)}
        if annotations:
            meta["annotations"] = annotations
        return {"type": "BOOKMARK",
                "object": {"kind": w.rt.kind, "apiVersion": w.rt.api_version, "metadata": meta}}

    def _notify(self) -> None:
        """Wake the waiters of ``wait_until`` whose condition now holds."""
        still = []
        for predicate, fut in self._waiters:
            if fut.done():
                continue
            try:
                ok = predicate()
            except Exception as e:  # surfaced to the waiting test
                fut.set_exception(e)
                continue
            if ok:
                fut.set_result(None)
            else:
                still.append((predicate, fut))
        self._waiters = still

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every write and every watch
        opened or closed (no polling). Use with ``asyncio.timeout``."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        try:
            await fut
        finally:
            fut.cancel()

    # --- test hooks ----------------------------------------------------------------------

    def compact(self) -> None:
        """Forget all history: any watch from an older resourceVersion now gets 410."""
        self.log.clear()
        self.compacted = self.rv

    def expire_next_watch(self, count: int = 1) -> None:
        """The next ``count`` watches get ``410 Expired`` whatever resourceVersion they ask."""
        self._expire_next += count

    def expire_watches(self, resource: str | None = None) -> int:
        """Compact all history and end open watches with ``410 Expired`` (an ERROR event),
        as an apiserver does when etcd compacts past a watcher: a write after this reaches a
        watcher only through a new list. Returns how many were ended."""
        rt = self.resource(resource) if resource else None
        self.compact()
        ended = [w for w in self.watches if rt is None or w.rt == rt]
        for w in ended:
            self._expire(w, self.rv)
        return len(ended)

    def break_watches(self, resource: str | None = None, clean: bool = False) -> int:
        """End open watches: abruptly (connection reset mid-stream) or cleanly (as a timeout
        does). Returns how many were ended."""
        rt = self.resource(resource) if resource else None
        ended = [w for w in self.watches if rt is None or w.rt == rt]
        for w in ended:
            w.queue.put_nowait(("end" if clean else "break", None))
        return len(ended)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every watch that allows them."""
        for w in self.watches:
            if w.bookmarks:
                w.queue.put_nowait(("bookmark", None))

    async def wait_for_watches(self, resource: str | None = None, count: int = 1) -> None:
        """Wait until at least ``count`` watches of ``resource`` are open."""
        rt = self.resource(resource) if resource else None
        await self.wait_until(
            lambda: sum(1 for w in self.watches if rt is None or w.rt == rt) >= count
        )

    def events(self, involved_name: str | None = None) -> builtins.list[JSON]:
        """Stored events (core v1 shape), oldest first, optionally about one object."""
        evs = [e for e in self.objects["events"].values()
               if involved_name is None or (e.get("involvedObject") or {}).get("name")
               == involved_name]
        return sorted(evs, key=lambda e: int(e["metadata"]["resourceVersion"]))

    # --- helpers -------------------------------------------------------------------------

    def _key(self, rt: ResourceType, namespace: str, name: str) -> Key:
        return (namespace if rt.namespaced else "", name)

    def _check_namespace(self, rt: ResourceType, meta: JSON, namespace: str) -> None:
        if not rt.namespaced:
            meta.pop("namespace", None)
            return
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request("the namespace of the provided object does not match the namespace "
                              "sent on the request")
        if not namespace:
            raise bad_request("a namespace is required for a namespaced resource")
        if ("", namespace) not in self.objects["namespaces"]:
            raise not_found("", "namespaces", namespace)
        meta["namespace"] = namespace


def _spec_of(obj: JSON) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _obj_key(obj: JSON) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


def _unkey(start: str) -> Key:
    if not start:
        return ("", "")
    path = start.rstrip("\x00")
    ns, _, name = path.rpartition("/")
    return (ns, name)


def _parse_rv(value: str | None) -> int:
    try:
        rv = int(value or "0")
    except ValueError as e:
        raise bad_request(f'Invalid value: "{value}": resourceVersion must be an integer') from e
    if rv < 0:
        raise bad_request(f'Invalid value: "{value}": resourceVersion must not be negative')
    return rv


def _decoded(rt: ResourceType, obj: JSON) -> tuple[JSON, JSON]:
    """A request's object as stored (kind and apiVersion checked, then dropped), and its
    metadata."""
    require_kind(rt, obj)
    obj.pop("kind", None)
    obj.pop("apiVersion", None)
    return obj, obj.setdefault("metadata", {})


def _check_url_name(meta: JSON, name: str) -> None:
    if meta.get("name") != name:
        raise bad_request(
            f"the name of the object ({meta.get('name', '')}) does not match the name on "
            f"the URL ({name})"
        )
