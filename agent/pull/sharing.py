"""The cross-namespace rule (DESIGN.md, "Kubernetes objects"): a model pulled with one
namespace's credentials is given to another namespace only after a metadata request to its
source, made with that namespace's own credentials, succeeds.

The credentials scope is part of a model's key now (``common.reference.scoped``): a model
pulled with a namespace's Secret is a key no other namespace names, so this check is left
for the models whose manifest does not record the scope (written before it was recorded).

A model pulled without credentials (a public source) needs no check. A model whose pull is
not known (found in the store at start-up) is checked for every namespace until one check
tells: a check that passes without credentials marks it public, one that passes with
credentials makes that namespace its owner. Successful checks are remembered for a short
time, so a burst of pods costs the source one request per namespace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.index import Model
from agent.sources.base import Credentials, Source
from common.errors import Forbidden, SourceAuthError, SourceNotFound

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096


class SharedAccess:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._passed: dict[tuple[str, str | None, str | None], float] = {}
        #: metadata requests made to sources (for metrics and tests)
        self.checks = 0

    @staticmethod
    def needs_check(model: Model, namespace: str | None) -> bool:
        origin = model.pulled_with
        if origin is None:
            return True
        owner, credentials_name = origin
        return credentials_name is not None and owner != namespace

    async def check(self, model: Model, source: Source, namespace: str | None,
                    credentials_name: str | None, credentials: Credentials | None) -> None:
        """Return if ``namespace`` may be served ``model``; raise :class:`Forbidden` if its
        credentials (``credentials_name``, possibly none) do not grant access at the source."""
        if not self.needs_check(model, namespace):
            return
        now = self._clock()
        memo = (model.key, namespace, credentials_name)
        if self._passed.get(memo, 0.0) > now:
            return
        self.checks += 1
        try:
            await source.check_access(model.ref, credentials)
        except (SourceAuthError, SourceNotFound) as e:
            who = f"namespace {namespace}" if namespace else "a caller without a namespace"
            what = f"credentials {credentials_name!r}" if credentials_name else "no credentials"
            log.info("cross-namespace access refused", extra={
                "key": model.key, "namespace": namespace, "error": str(e)})
            raise Forbidden(
                f"{ref_text(model)} was pulled with another namespace's credentials and the "
                f"source refuses {who} with {what}") from e
        self._remember(memo, now + self.ttl)
        if model.pulled_with is None:
            model.pulled_with = (namespace, credentials_name)

    def _remember(self, memo: tuple[str, str | None, str | None], until: float) -> None:
        if len(self._passed) >= MAX_REMEMBERED:
            now = self._clock()
            self._passed = {k: t for k, t in self._passed.items() if t > now}
            if len(self._passed) >= MAX_REMEMBERED:
                self._passed.clear()
        self._passed[memo] = until


def ref_text(model: Model) -> str:
    return f"model {model.key} ({model.ref.display})"
