"""``http(s)://HOST/PATH``: one file, or an archive (``.tar``, ``.tar.gz``, ``.tar.zst``,
``.zip``) whose members become the model's files.

Resolving asks the server for the file's size, ETag and Last-Modified (HEAD, or a one-byte
ranged GET where HEAD is refused, as presigned URLs do). The revision is the strong ETag, or
else the Last-Modified date: a change detector, not proof of content.

Credentials (a Secret's keys, all optional): ``token`` (sent as a bearer token),
``username`` + ``password`` (basic auth), or ``authorization`` (the whole header value).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from urllib.parse import unquote

from agent.sources.base import Credentials, Location, RemoteFile, Resolved
from agent.sources.control import Control
from agent.store.names import safe_relpath
from common.errors import SourceError
from common.reference import Reference
from common.reference import archive_kind as kind_of


class HttpSource:
    schemes: tuple[str, ...] = ("http", "https")

    def __init__(self, control: Control) -> None:
        self.control = control

    async def close(self) -> None:
        await self.control.close()

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        url = f"{ref.scheme}://{ref.host}/{ref.path}"
        headers = auth_headers(credentials)
        size, etag, last_modified = await self._stat(url, headers)
        name = unquote(ref.path.split("?", 1)[0].rsplit("/", 1)[-1])
        name = safe_relpath(name, what="file name from the URL")
        kind = kind_of(name)
        if kind is None and not ref.matches(name):
            raise SourceError(f"include globs {list(ref.include)} select no file of {ref.display}")
        file = RemoteFile(
            path=name, url=url, size=size, etag=etag or last_modified,
            unpack=kind,  # type: ignore[arg-type]
        )
        revision = etag or (f"last-modified:{last_modified}" if last_modified else "unversioned")
        return Resolved(ref, revision, (file,))

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        return Location(file.url, {**file.headers, **auth_headers(credentials)})

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        await self._stat(f"{ref.scheme}://{ref.host}/{ref.path}", auth_headers(credentials))

    async def _stat(self, url: str, headers: Mapping[str, str]
                    ) -> tuple[int | None, str | None, str | None]:
        """(size, strong ETag, Last-Modified) of a URL: HEAD, or a one-byte ranged GET where
        HEAD is refused (presigned GET URLs); resets, 5xx and 429 are retried."""
        head = await self.control.request("HEAD", url, headers=headers,
                                          ok=(200, 403, 405, 501), read_body=False)
        if head.status == 200:
            length = head.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            return size, _strong(head.headers.get("ETag")), head.headers.get("Last-Modified")
        probe = await self.control.request("GET", url, headers={**headers, "Range": "bytes=0-0"},
                                           ok=(200, 206), read_body=False)
        hdrs = probe.headers
        if probe.status == 206:
            total = hdrs.get("Content-Range", "").rpartition("/")[2]
            size = int(total) if total.isdigit() else None
        else:
            length = hdrs.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
        return size, _strong(hdrs.get("ETag")), hdrs.get("Last-Modified")


def auth_headers(credentials: Credentials | None) -> dict[str, str]:
    """HTTP headers from a credentials mapping (see the module docstring)."""
    if not credentials:
        return {}
    creds = {k.lower(): v for k, v in credentials.items()}
    if "authorization" in creds:
        return {"Authorization": creds["authorization"].strip()}
    if "token" in creds:
        return {"Authorization": f"Bearer {creds['token'].strip()}"}
    if "username" in creds and "password" in creds:
        raw = f"{creds['username']}:{creds['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    return {}


def _strong(etag: str | None) -> str | None:
    """An ETag usable as a change detector across ranges (weak ones are not)."""
    if not etag or etag.startswith("W/"):
        return None
    return etag.strip()
