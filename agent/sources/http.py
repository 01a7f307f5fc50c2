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

import aiohttp

from agent.archive import kind_of
from agent.egress import Egress, shown_url, status_error
from agent.errors import SourceError, TransientError
from agent.names import safe_relpath
from agent.reference import Reference
from agent.sources.base import Credentials, Location, RemoteFile, Resolved


class HttpSource:
    schemes: tuple[str, ...] = ("http", "https")

    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self.egress.session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        url = f"{ref.scheme}://{ref.host}/{ref.path}"
        headers = auth_headers(credentials)
        size, etag, last_modified, ranges = await self._stat(url, headers)
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
        del ranges  # the fetch engine finds out for itself and falls back to one connection
        return Resolved(ref, revision, (file,))

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        return Location(file.url, {**file.headers, **auth_headers(credentials)})

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        await self._stat(f"{ref.scheme}://{ref.host}/{ref.path}", auth_headers(credentials))

    async def _stat(self, url: str, headers: Mapping[str, str]
                    ) -> tuple[int | None, str | None, str | None, bool]:
        """(size, strong ETag, Last-Modified, accepts ranges) of a URL."""
        session = self._http()
        resp = await self.egress.request(session, "HEAD", url, headers=headers)
        async with resp:
            status = resp.status
            hdrs = resp.headers
        if status in (403, 405, 501):  # presigned GET URLs and some servers refuse HEAD
            resp = await self.egress.request(session, "GET", url,
                                             headers={**headers, "Range": "bytes=0-0"})
            async with resp:
                status, hdrs = resp.status, resp.headers
                if status == 206:
                    total = hdrs.get("Content-Range", "").rpartition("/")[2]
                    size = int(total) if total.isdigit() else None
                    return size, _strong(hdrs.get("ETag")), hdrs.get("Last-Modified"), True
        if status >= 400:
            raise status_error(status, shown_url(url), hdrs.get("Retry-After"))
        if status != 200:
            raise TransientError(f"{shown_url(url)}: unexpected status {status}")
        length = hdrs.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        ranges = hdrs.get("Accept-Ranges", "").lower() == "bytes"
        return size, _strong(hdrs.get("ETag")), hdrs.get("Last-Modified"), ranges


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
