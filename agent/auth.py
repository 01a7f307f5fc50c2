"""Who may call the admin API.

Reads are open (standalone) and writes need a bearer token. Standalone, the token is the
content of ``--token-file`` (created with a random token if it does not exist, mode 0600).
In a cluster, ``agent/cluster/auth.py`` provides an authenticator backed by TokenReview and
SubjectAccessReview that plugs in here.

Actions: ``read`` (the model list, a model, the store), ``ensure`` (ask for a model: the
caller is authenticated first, then ``admit`` decides for that model), ``write`` (evict,
collect garbage), ``peer`` (blobs, for other agents).
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web

from common.errors import Unauthorized
from common.reference import Reference


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    name: str
    namespace: str | None = None
    """The caller's namespace: where the credentials Secret it names is read."""
    groups: tuple[str, ...] = field(default=())
    pod: str | None = None
    """``namespace/name`` of the pod running on this node that the caller's token is bound
    to (an injected init container), if any."""


class Authenticator(Protocol):
    async def authenticate(self, request: web.Request, action: str) -> Caller:
        """Return the caller allowed to do ``action`` (``write``, ``read``, ``peer``), or raise
        :class:`~common.errors.Unauthorized` / :class:`~common.errors.Forbidden`."""
        ...

    async def admit(self, caller: Caller, ref: Reference, credentials: str | None,
                    pin: bool) -> None:
        """Raise :class:`~common.errors.Forbidden` unless ``caller`` (authenticated for
        ``ensure``) may have this model ensured, with the credentials it names, pinned or
        not."""
        ...


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class TokenFileAuth:
    """Standalone: one shared token for writes and peers; reads are open."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self._token = token.encode()

    @classmethod
    def from_file(cls, path: Path, create: bool = True) -> TokenFileAuth:
        if not path.exists() and create:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        return cls(path.read_text().strip())

    async def authenticate(self, request: web.Request, action: str) -> Caller:
        if action == "read":
            return Caller("anonymous")
        token = bearer(request)
        if token is None:
            raise Unauthorized("this request needs a bearer token (Authorization: Bearer ...)")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthorized("the bearer token is not valid")
        return Caller("admin")

    async def admit(self, caller: Caller, ref: Reference, credentials: str | None,
                    pin: bool) -> None:
        return None  # the token's holder is the admin
