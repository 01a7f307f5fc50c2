"""The in-memory index of models: what the API, node labels and metrics publish.

Rebuilt from the store's manifests at start-up; updated by the puller. Waiters (``?wait=``)
are woken on every change. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.store.trees import Manifest, iso
from agent.verify.gate import verified_under
from common.reference import Reference

PULLING, READY, FAILED = "pulling", "ready", "failed"


@dataclass
class Model:
    ref: Reference
    state: str = PULLING
    manifest: Manifest | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    error: str | None = None
    error_reason: str | None = None
    """The failure's reason (``ModelcacheError.reason``: ``verification``, ...)."""
    pinned: bool = False
    last_used: float = 0.0
    started: float = field(default_factory=time.time)
    refreshing: bool = False
    holders: dict[str, float] = field(default_factory=dict)
    """Who uses the model now (a lease owner, a pod) and until when (0: no expiry)."""
    pulled_with: tuple[str | None, str | None] | None = None
    """(namespace, credentials name) of the pull that fetched it; ``None``: not known (a
    model found in the store at start-up). Decides the cross-namespace check."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    intent: dict[str, Any] | None = field(default=None, repr=False)
    """The running pull's intent: the blobs it committed are not garbage yet."""

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def in_use(self) -> bool:
        now = time.time()
        return any(until == 0 or until > now for until in self.holders.values())

    def to_json(self) -> dict[str, Any]:
        """The model as the admin API shows it (DESIGN.md: the exact shape)."""
        m = self.manifest
        files = [{"path": f.path, "size": f.size, "blake3": f.blake3,
                  **({"sha256": f.sha256} if f.sha256 else {}),
                  **({"git_oid": f.git_oid} if f.git_oid else {})} for f in m.files] if m else []
        size = m.size_bytes if m and self.state == READY else self.bytes_total
        verified = None
        if m is not None and m.verified is not None and self.state == READY \
                and self.ref.verify and verified_under(m, self.ref.verify):
            check = m.verified
            verified = {"policy": check.policy, "signer": check.signer,
                        "time": iso(check.time), "method": check.method}
        return {
            "key": self.key,
            "uri": self.ref.display,
            "revision": m.revision if m else None,
            "state": self.state,
            "files": files,
            "size_bytes": size,
            "bytes_done": size if self.state == READY else self.bytes_done,
            "last_used": iso(self.last_used) or None,
            "pinned": self.pinned,
            "in_use": self.in_use,
            "error": self.error,
            "verified": verified,
        }


class Index:
    def __init__(self) -> None:
        self._models: dict[str, Model] = {}
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[Model], None]] = []
        self._waking: asyncio.Task[None] | None = None

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def get(self, key: str) -> Model | None:
        return self._models.get(key)

    def add(self, model: Model) -> Model:
        self._models[model.key] = model
        self.notify(model)
        return model

    def remove(self, key: str) -> Model | None:
        model = self._models.pop(key, None)
        if model is not None:
            self.notify(model)
        return model

    def on_change(self, listener: Callable[[Model], None]) -> None:
        """Call ``listener`` (synchronously, on the loop) after every change."""
        self._listeners.append(listener)

    def notify(self, model: Model) -> None:
        for listener in self._listeners:
            listener(model)
        if self._waking is None or self._waking.done():  # one wake-up serves many changes
            self._waking = asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, key: str, seconds: float) -> Model | None:
        """Wait until the model is ready or failed (or gone), at most ``seconds``."""
        def settled() -> bool:
            m = self._models.get(key)
            return m is None or m.state != PULLING

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(settled), seconds)
        return self._models.get(key)

    def counts(self) -> dict[str, int]:
        counts = {PULLING: 0, READY: 0, FAILED: 0}
        for m in self._models.values():
            counts[m.state] += 1
        return counts
