"""``hf://ORG/REPO[@REVISION]``: a Hugging Face hub model repository, or a mirror of one.

1. ``GET {endpoint}/api/models/{repo}/revision/{rev}`` resolves a branch or tag to its
   40-hex commit (skipped when the revision already is one);
2. ``GET {endpoint}/api/models/{repo}/tree/{sha}?recursive=true`` lists the files (paginated
   by ``Link: rel="next"``), with sizes and, for LFS files, their sha256 (for files kept
   in git, their git blob id);
3. each file is fetched from ``{endpoint}/{repo}/resolve/{sha}/{path}`` (the hub redirects
   LFS files to a CDN: the fetch engine follows under the egress policy and drops the token
   when the host changes), and LFS files are verified against their sha256 in the same pass
   as blake3 (files kept in git against their git blob id); a file whose sha256 or git
   blob id the store already holds is not downloaded.

The endpoint is ``HF_ENDPOINT`` (a mirror or an air-gapped hub). The token is the
credentials' ``token`` (or ``HF_TOKEN``) key, else the agent's own ``HF_TOKEN``.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urljoin, urlsplit

from agent.sources.base import Credentials, Location, RemoteFile, Resolved
from agent.sources.control import Control
from agent.store.names import check_unique, safe_relpath
from common.errors import SourceError
from common.reference import Reference

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID = re.compile(r"^[0-9a-f]{40}$")
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
MAX_PAGES = 1000


class HfSource:
    schemes: tuple[str, ...] = ("hf",)

    def __init__(self, control: Control, endpoint: str, token: str | None = None) -> None:
        self.control = control
        self.endpoint = endpoint.rstrip("/")
        self._token = token

    def _headers(self, credentials: Credentials | None) -> dict[str, str]:
        token = None
        if credentials:
            creds = {k.lower(): v for k, v in credentials.items()}
            token = creds.get("token") or creds.get("hf_token")
        token = token or self._token
        return {"Authorization": f"Bearer {token.strip()}"} if token else {}

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        headers = self._headers(credentials)
        repo = ref.path
        sha = await self._commit(repo, ref.revision, headers)
        files: list[RemoteFile] = []
        url: str | None = (f"{self.endpoint}/api/models/{repo}/tree/{sha}"
                           "?recursive=true&expand=false")
        pages = 0
        while url:
            pages += 1
            if pages > MAX_PAGES:
                raise SourceError(f"hf://{repo}: the file listing has more than {MAX_PAGES} pages")
            reply = await self.control.json(url, headers=headers)
            entries = reply.json()
            if not isinstance(entries, list):
                raise SourceError(f"hf://{repo}: the tree listing is not a list")
            for entry in entries:
                file = self._file(repo, sha, entry)
                if file is not None:
                    files.append(file)
            url = self._next_link(repo, reply.headers.get("Link", ""), reply.url)
        if not files:
            raise SourceError(f"hf://{repo}@{sha} has no files")
        check_unique((f.path for f in files), what=f"hf://{repo} file name")
        return Resolved(ref, sha, tuple(files))

    async def _commit(self, repo: str, revision: str, headers: dict[str, str]) -> str:
        if _COMMIT.match(revision):
            return revision
        url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
        info = (await self.control.json(url, headers=headers)).json()
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not _COMMIT.match(sha):
            raise SourceError(f"hf://{repo}@{revision}: the hub did not answer a commit sha")
        return sha

    def _file(self, repo: str, sha: str, entry: object) -> RemoteFile | None:
        if not isinstance(entry, dict):
            raise SourceError(f"hf://{repo}: malformed tree entry")
        if entry.get("type") != "file":
            return None
        path, size = entry.get("path"), entry.get("size")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            raise SourceError(f"hf://{repo}: tree entry without a valid path and size")
        path = safe_relpath(path, what=f"hf://{repo} file name")
        digest = git_oid = None
        lfs = entry.get("lfs")
        if isinstance(lfs, dict):
            oid = lfs.get("oid") or lfs.get("sha256")
            lfs_size = lfs.get("size", size)
            if not isinstance(oid, str) or not _SHA256.match(oid):
                raise SourceError(f"hf://{repo}: {path!r} has a malformed LFS sha256")
            if not isinstance(lfs_size, int) or lfs_size < 0:
                raise SourceError(f"hf://{repo}: {path!r} has a malformed LFS size")
            digest, size = oid, lfs_size
        elif (oid := entry.get("oid")) is not None:  # kept in git: its oid is the blob's
            if not isinstance(oid, str) or not _GIT_OID.match(oid):
                raise SourceError(f"hf://{repo}: {path!r} has a malformed git oid")
            git_oid = oid
        url = f"{self.endpoint}/{repo}/resolve/{sha}/{quote(path)}"
        # No ETag: the commit in the URL pins the content (the hub's ETag for an LFS file
        # is its sha256, not the tree's git oid, so the two must not be compared). No
        # headers either: locate() adds the token for each connection.
        return RemoteFile(path=path, url=url, size=size, sha256=digest, git_oid=git_oid)

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        return Location(file.url, {**file.headers, **self._headers(credentials)})

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        url = f"{self.endpoint}/api/models/{ref.path}/revision/{quote(ref.revision, safe='')}"
        await self.control.json(url, headers=self._headers(credentials))

    async def close(self) -> None:
        await self.control.close()


    def _next_link(self, repo: str, header: str, current: str) -> str | None:
        """The next page's URL, which must stay on the hub the token is meant for."""
        match = _NEXT.search(header)
        if not match:
            return None
        url = urljoin(current, str(match.group(1)))
        if _origin(url) != _origin(self.endpoint):
            raise SourceError(
                f"hf://{repo}: the tree listing's next page is on another host "
                f"({_origin(url)}, not {_origin(self.endpoint)}); refused")
        return url


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"
