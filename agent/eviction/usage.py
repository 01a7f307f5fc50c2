"""Who uses which model: the in-use truth behind ``Model.holders``, fed by its sources.

A holder is a string naming who uses models (``pod:<namespace>/<name>`` for a pod on this
node, ``lease:<owner>`` for an API lease). ``set(holder, keys)`` says which models it uses
now; the tracker writes that into ``Model.holders`` of the models in the index, and again
into a model that appears later (a pod may name a model before the model is pulled).
``known`` is set once every source has reported (in a cluster: the pod informer's first
list), so eviction can wait for it after a restart instead of evicting what a running pod
uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from agent.index import Index, Model


class Usage:
    def __init__(self, index: Index, known: bool = True) -> None:
        self.index = index
        self._keys: dict[str, set[str]] = {}
        """The models each holder uses."""
        self._holds: dict[str, dict[str, float]] = {}
        """By model key: its holders and until when (0: until told otherwise)."""
        #: set once the in-use information is complete
        self.known = asyncio.Event()
        if known:
            self.known.set()
        index.on_change(self._apply)

    def holders_of(self, key: str) -> frozenset[str]:
        return frozenset(self._holds.get(key, ()))

    def set(self, holder: str, keys: Iterable[str], until: float = 0.0) -> None:
        """``holder`` uses exactly ``keys`` now (until ``until``, 0: until told otherwise)."""
        new = set(keys)
        for key in self._keys.get(holder, set()) - new:
            self.release(holder, key)
        for key in new:
            self.hold(holder, key, until)

    def hold(self, holder: str, key: str, until: float = 0.0) -> None:
        """``holder`` uses the model ``key`` (too), until ``until`` (0: until released)."""
        self._keys.setdefault(holder, set()).add(key)
        self._holds.setdefault(key, {})[holder] = until
        model = self.index.get(key)
        if model is not None and model.holders.get(holder) != until:
            model.holders[holder] = until
            self.index.notify(model)

    def release(self, holder: str, key: str) -> None:
        """``holder`` no longer uses the model ``key``."""
        keys = self._keys.get(holder)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[holder]
        holds = self._holds.get(key)
        if holds is not None:
            holds.pop(holder, None)
            if not holds:
                del self._holds[key]
        model = self.index.get(key)
        if model is not None and model.holders.pop(holder, None) is not None:
            self.index.notify(model)

    def drop(self, holder: str) -> None:
        """``holder`` uses nothing any more."""
        self.set(holder, ())

    def _apply(self, model: Model) -> None:
        """Index listener: a model (new, or pulled again) gets the holders it has."""
        for holder, until in self._holds.get(model.key, {}).items():
            model.holders.setdefault(holder, until)
