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
        self._keys: dict[str, frozenset[str]] = {}
        self._holders: dict[str, set[str]] = {}
        #: set once the in-use information is complete
        self.known = asyncio.Event()
        if known:
            self.known.set()
        index.on_change(self._apply)

    def holders_of(self, key: str) -> frozenset[str]:
        return frozenset(self._holders.get(key, ()))

    def keys_of(self, holder: str) -> frozenset[str]:
        return self._keys.get(holder, frozenset())

    def set(self, holder: str, keys: Iterable[str], until: float = 0.0) -> None:
        """``holder`` uses exactly ``keys`` now (until ``until``, 0: until told otherwise)."""
        new = frozenset(keys)
        old = self._keys.get(holder, frozenset())
        if new:
            self._keys[holder] = new
        else:
            self._keys.pop(holder, None)
        for key in old - new:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._holders[key]
            self._write(key, holder, None)
        for key in new:
            self._holders.setdefault(key, set()).add(holder)
            self._write(key, holder, until)

    def drop(self, holder: str) -> None:
        """``holder`` uses nothing any more."""
        self.set(holder, ())

    def _write(self, key: str, holder: str, until: float | None) -> None:
        model = self.index.get(key)
        if model is None:
            return
        if until is None:
            if model.holders.pop(holder, None) is None:
                return
        elif model.holders.get(holder) == until:
            return
        else:
            model.holders[holder] = until
        self.index.notify(model)

    def _apply(self, model: Model) -> None:
        """Index listener: a model (new, or pulled again) gets the holders it has."""
        for holder in self._holders.get(model.key, ()):
            model.holders.setdefault(holder, 0.0)
