"""Leases: standalone, a model is in use while someone holds a lease on it.

``POST /api/v1/models/{key}/leases`` takes (or renews) a lease for an owner and a time to
live; ``DELETE .../leases/{owner}`` releases it. A lease is a holder ``lease:<owner>`` in
``Model.holders`` (the one source of in-use truth, which the cluster side feeds with
``pod:<namespace>/<name>``), expiring with the lease. Leases are kept in
``<store>/leases.json`` (temporary file, fsync, rename, fsync of the directory) before a
request is answered, so that after a restart what is in use is known again from disk;
expired leases are ignored when read and pruned by :meth:`Leases.expire`.

Taking or releasing a lease counts as a use of the model (its last use moves to now).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from agent.eviction.usage import Usage
from agent.index import Index
from agent.store.blobs import write_atomic
from common.errors import InvalidInput, NoSpace, NotFound, StoreError

log = logging.getLogger(__name__)

HOLDER = "lease:"
MAX_TTL_SECONDS = 10 * 365 * 86400.0
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}$")

Table = dict[str, dict[str, float]]
"""Expiry (epoch seconds) by model key, then owner."""


def check_lease(owner: Any, ttl: Any) -> tuple[str, float]:
    """Validate a lease request's ``owner`` and ``ttl_seconds``."""
    if not isinstance(owner, str) or not _OWNER.match(owner):
        raise InvalidInput('"owner" must be 1-253 characters: letters, digits and ._:@- '
                           "(starting with a letter or a digit)")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) \
            or not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidInput('"ttl_seconds" must be a number of seconds above 0 and at most '
                           f"{MAX_TTL_SECONDS:.0f}")
    return owner, float(ttl)


class Leases:
    """The leases of one store, applied to the models of one index."""

    def __init__(self, path: Path, tmp: Path, index: Index, usage: Usage) -> None:
        """``path``: the store's leases file (``Store.leases_file``); ``tmp``: where its
        next version is written before the rename."""
        self.path = path
        self.tmp = tmp
        self.index = index
        self.usage = usage  # applies each lease to its model, also one that appears later
        self.table: Table = {}
        self._write_lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the leases kept on disk and hold their models."""
        self.table = await asyncio.to_thread(self._read)
        for key, owners in self.table.items():
            for owner, expires in owners.items():
                self.usage.hold(HOLDER + owner, key, expires)

    async def take(self, key: str, owner: str, ttl: float) -> float:
        """Hold the model in use for ``ttl`` seconds on behalf of ``owner`` (taking it again
        renews it). Returns when it expires (epoch seconds)."""
        if self.index.get(key) is None:
            raise NotFound(f"model {key} is not in the store")
        now = time.time()
        expires = now + ttl
        table = self._copy()
        table.setdefault(key, {})[owner] = expires
        await self._commit(table)
        self._touch(key, now)
        self.usage.hold(HOLDER + owner, key, expires)
        return expires

    async def release(self, key: str, owner: str) -> None:
        if owner not in self.table.get(key, {}):
            raise NotFound(f"model {key} has no lease held by {owner!r}")
        table = self._copy()
        del table[key][owner]
        await self._commit(table)
        self._touch(key, time.time())
        self.usage.release(HOLDER + owner, key)

    async def drop(self, key: str) -> None:
        """Forget every lease on a model (it was removed by force)."""
        if key in self.table:
            table = self._copy()
            owners = table.pop(key)
            await self._commit(table)
            for owner in owners:
                self.usage.release(HOLDER + owner, key)

    async def expire(self) -> None:
        """Prune expired leases (they already stopped counting as in use)."""
        now = time.time()
        expired = [(k, o) for k, owners in self.table.items() for o, e in owners.items()
                   if e <= now]
        if not expired:
            return
        table = self._copy()
        for key, owner in expired:
            del table[key][owner]
        await self._commit(table)
        for key, owner in expired:
            self.usage.release(HOLDER + owner, key)

    def _touch(self, key: str, now: float) -> None:
        """Taking or releasing a lease is a use of the model."""
        model = self.index.get(key)
        if model is not None:
            model.last_used = max(model.last_used, now)

    def _copy(self) -> Table:
        return {k: dict(v) for k, v in self.table.items()}

    # --- on disk (blocking) --------------------------------------------------------------

    async def _commit(self, table: Table) -> None:
        """Make ``table`` the leases, on disk first."""
        table = {k: v for k, v in table.items() if v}
        async with self._write_lock:
            await asyncio.to_thread(self._write, table)
            self.table = table

    def _read(self) -> Table:
        try:
            data = json.loads(self.path.read_text())
            now = time.time()
            table = {str(key): {str(o): float(e) for o, e in owners.items() if float(e) > now}
                     for key, owners in data["leases"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("the leases file is unreadable; starting without leases",
                        extra={"path": str(self.path), "error": str(e)})
            return {}
        return {k: v for k, v in table.items() if v}

    def _write(self, table: Table) -> None:
        data = json.dumps({"version": 1, "leases": table}, sort_keys=True).encode()
        try:
            write_atomic(self.path, data, self.tmp, mode=0o600)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"cannot record the lease: {e.strerror}") from e
            raise StoreError(f"cannot write {self.path}: {e.strerror}") from e
