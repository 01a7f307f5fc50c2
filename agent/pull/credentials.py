"""Where credentials for a source come from.

In a cluster a pull names a Secret in the caller's namespace (``common/kube/client.py`` reads it);
standalone, a directory laid out like a mounted Secret: ``<dir>/<name>/<key>`` files.
Credentials are passed down as a mapping and never logged or returned.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Protocol

from agent.sources.base import Credentials
from common.errors import InvalidInput, KubeError, NotFound, SourceAuthError

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")


class CredentialsProvider(Protocol):
    async def get(self, namespace: str | None, name: str) -> Credentials:
        """The credentials called ``name`` (in ``namespace``, in a cluster)."""
        ...


class SecretReader(Protocol):
    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        ...


class SecretCredentials:
    """In a cluster: the Secret ``name`` in ``namespace``, read when a pull needs it (never
    listed, never cached: a rotated Secret is used at the next pull)."""

    def __init__(self, reader: SecretReader) -> None:
        self.reader = reader

    async def get(self, namespace: str | None, name: str) -> Credentials:
        if not _NAME.match(name):
            raise InvalidInput(f"credentials name {name!r} is not a valid Secret name")
        if not namespace:
            raise InvalidInput(f"credentials {name!r}: a Secret needs a namespace, and this "
                               "caller has none")
        try:
            return await self.reader.read_secret(namespace, name)
        except NotFound:
            raise
        except KubeError as e:  # RBAC: this namespace did not let the agent read its Secrets
            raise SourceAuthError(
                f"credentials {name!r}: the agent may not read Secrets of namespace "
                f"{namespace} ({e}); its admin grants it with a RoleBinding to ClusterRole "
                "modelcache-agent-secrets (deploy/README.md, Private models)") from e


class DirectoryCredentials:
    """Standalone: ``<root>/<name>/<key>`` files, as a Secret volume would be mounted."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    async def get(self, namespace: str | None, name: str) -> Credentials:
        if not _NAME.match(name):
            raise InvalidInput(f"credentials name {name!r} is not a valid Secret name")
        if self.root is None:
            raise NotFound(f"credentials {name!r}: this agent has no --credentials-dir")
        return await asyncio.to_thread(read_secret_dir, self.root / name)


def read_secret_dir(path: Path) -> dict[str, str]:
    """Read a directory of ``key -> file`` (a mounted Secret); hidden entries skipped."""
    if not path.is_dir():
        raise NotFound(f"credentials {path.name!r} not found")
    data: dict[str, str] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        data[entry.name] = entry.read_text().strip()
    return data
