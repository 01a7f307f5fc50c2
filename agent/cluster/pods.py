"""The pods running on this node, and the models each one uses.

Fed by the pod informer (``spec.nodeName`` field selector). A pod uses the model its
``modelcache.io/model`` (+ ``modelcache.io/include``, ``modelcache.io/verify``) annotations
name, and the one the webhook recorded in ``modelcache.io/injected``; a pending or running
pod holds them, a pod that has terminated or is gone releases them. The same directory tells
the admin API which pod a bound service-account token belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from common.errors import ModelcacheError
from common.reference import KEY_HEX, scoped

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MODEL = "modelcache.io/model"
INCLUDE = "modelcache.io/include"
CREDENTIALS = "modelcache.io/credentials"
VERIFY = "modelcache.io/verify"
INJECTED = "modelcache.io/injected"
WARM_MEMORY = "modelcache.io/warm-memory"
FINISHED = ("Succeeded", "Failed")
_KEY = re.compile(rf"^[0-9a-f]{{{KEY_HEX}}}$")


def pod_key(pod: Obj) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def holder(key: str) -> str:
    """The ``Model.holders`` key of the pod ``namespace/name``."""
    return f"pod:{key}"


def running(pod: Obj) -> bool:
    """Pending or running: its containers may use (or be about to use) its models."""
    return (pod.get("status") or {}).get("phase") not in FINISHED


def models_of(pod: Obj) -> frozenset[str]:
    """Keys of the models a pod asks for by annotation (invalid annotations name none: the
    webhook denies those pods, and nothing else may make them valid)."""
    meta = pod.get("metadata") or {}
    notes = meta.get("annotations") or {}
    keys: set[str] = set()
    uri = notes.get(MODEL)
    if isinstance(uri, str):
        try:
            verify, credentials = notes.get(VERIFY), notes.get(CREDENTIALS)
            ref = scoped(uri, notes.get(INCLUDE), namespace=meta.get("namespace") or None,
                         credentials=credentials.strip() if isinstance(credentials, str)
                         and credentials.strip() else None,
                         verify=verify.strip() if isinstance(verify, str) else None)
        except ModelcacheError:
            ref = None
        if ref is not None and ref.cached:
            keys.add(ref.key)
    injected = notes.get(INJECTED)
    if isinstance(injected, str):
        with contextlib.suppress(ValueError):
            doc = json.loads(injected)
            if isinstance(doc, dict) and isinstance(doc.get("key"), str):
                keys.add(doc["key"])
    return frozenset(keys)


def hostpath_keys(pod: Obj) -> frozenset[str]:
    """Keys of the model directories a pod gets as a hostPath (mode cache, as the webhook
    recorded in ``modelcache.io/injected``): the agent makes each one before kubelet sets the
    pod's volumes up (the webhook's hostPath is of type ``Directory``)."""
    notes = (pod.get("metadata") or {}).get("annotations") or {}
    with contextlib.suppress(ValueError, TypeError):
        doc = json.loads(notes.get(INJECTED) or "null")
        if isinstance(doc, dict) and doc.get("mode") == "cache" \
                and isinstance(doc.get("key"), str) and _KEY.match(doc["key"]):
            return frozenset({doc["key"]})
    return frozenset()


def pending(pod: Obj) -> bool:
    """Bound but not started: its images are being pulled, its init containers run."""
    return bool((pod.get("status") or {}).get("phase", "Pending") == "Pending")


def warm_refusal(pod: Obj | None) -> str | None:
    """Why the page cache must not be warmed for this pod's model (a metric reason), or
    None: ``opted_out`` (annotation ``modelcache.io/warm-memory: "false"``),
    ``download_mode`` (the webhook gave it a copy of its own, not the node's files)."""
    notes = ((pod or {}).get("metadata") or {}).get("annotations") or {}
    if str(notes.get(WARM_MEMORY, "")).strip() == "false":
        return "opted_out"
    with contextlib.suppress(ValueError, TypeError):
        doc = json.loads(notes.get(INJECTED) or "null")
        if isinstance(doc, dict) and doc.get("mode") == "download":
            return "download_mode"
    return None


def credentials_of(pod: Obj) -> str | None:
    """The Secret the pod's annotations name for its model, if any."""
    name = ((pod.get("metadata") or {}).get("annotations") or {}).get(CREDENTIALS)
    return name if isinstance(name, str) and name else None


class PodDirectory:
    """The pending and running pods of this node, by ``namespace/name``."""

    def __init__(self) -> None:
        self._pods: dict[str, Obj] = {}
        self._changed = asyncio.Condition()
        #: set once the informer's first list is in
        self.synced = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pods)

    def get(self, key: str) -> Obj | None:
        return self._pods.get(key)

    async def put(self, pod: Obj) -> None:
        self._pods[pod_key(pod)] = pod
        async with self._changed:
            self._changed.notify_all()

    def remove(self, key: str) -> None:
        self._pods.pop(key, None)

    async def find(self, key: str, uid: str, wait: float) -> Obj | None:
        """The pod ``key`` with this ``uid``, waiting up to ``wait`` seconds for it to
        appear (a watch event can arrive after the pod's init container has started)."""

        def found() -> bool:
            pod = self._pods.get(key)
            return pod is not None and (pod.get("metadata") or {}).get("uid") == uid

        return self._pods.get(key) if await self.until(found, wait) else None

    async def until(self, predicate: Callable[[], bool], wait: float) -> bool:
        """Wait up to ``wait`` seconds for ``predicate()`` to hold, looking again after every
        pod the informer puts; whether it holds."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):  # (not wait_for: see agent/warm.py)
                async with asyncio.timeout(wait):
                    await self._changed.wait_for(predicate)
        return predicate()
