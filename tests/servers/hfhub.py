"""A Hugging Face Hub-compatible server: repos, commits, branches and tags, LFS, a CDN.

Enough of the Hub's HTTP API for ``huggingface_hub.snapshot_download`` (the faithfulness
test runs the real client against it) and for modelcache's ``hf://`` source:

- ``GET /api/models/{repo}[/revision/{rev}]``: model info with the 40-hex ``sha`` and
  ``siblings`` (``?blobs=true`` adds sizes, blob ids and LFS info);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true``: entries
  ``{type, oid, size, path, lfs?: {oid, size, pointerSize}}``, paginated by a
  ``Link: <...>; rel="next"`` header (``page_size`` is small in tests on purpose);
- ``GET /api/models/{repo}/refs``: branches and tags;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob id for
  regular files, sha256 for LFS files), ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS,
  ``Range``. With ``cdn=True`` LFS files answer 302 to a second server (the "CDN", another
  port) with a signed URL, and the CDN refuses requests that carry ``Authorization`` (as
  S3 presigned URLs do), so a client that forwards the Hub token across hosts fails.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)
as the Hub's do. Private repos (or every repo with ``require_auth``) answer 401 without a
valid ``Authorization: Bearer`` token. Faults from :mod:`tests.servers.faulty` (429 with
``Retry-After``, resets, short bodies, ...) can be queued per request kind: ``info``,
``tree``, ``refs``, ``resolve``, ``cdn``. Every request is logged with the
``Authorization`` it carried. :meth:`HubServer.hostile_commit` stores entries with
unchecked names (``..``, absolute, NUL, duplicates) for security tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from aiohttp import web

from tests.servers.aioserver import AppThread
from tests.servers.faulty import Fault, Resource, Served, make_resource, new_record, respond
from tests.servers.net import LOOPBACK

LFS_SUFFIXES = (
    ".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
    ".npz", ".tflite", ".model", ".zip", ".tar", ".gz", ".zst",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES
)
CDN_HOST = "127.0.0.2"
"""The CDN's address: loopback, but another host than the hub's 127.0.0.1."""
KINDS = ("info", "tree", "refs", "resolve", "cdn")
_EPOCH = 1_700_000_000


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub calls ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "https://git-lfs.github.com/spec/v1"
    return f"version {spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes
    lfs: bool
    sha256: str
    oid: str
    """Git blob id: of the content, or of the LFS pointer for LFS files."""

    @classmethod
    def make(cls, path: str, data: bytes, lfs: bool) -> HubFile:
        sha = hashlib.sha256(data).hexdigest()
        oid = git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return cls(path=path, data=data, lfs=lfs, sha256=sha, oid=oid)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    sha: str
    files: tuple[HubFile, ...]
    message: str
    date: float
    parent: str | None

    def lookup(self, path: str) -> HubFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: float = _EPOCH

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None and rev.startswith("refs/heads/"):
            sha = self.branches.get(rev.removeprefix("refs/heads/"))
        if sha is None and rev.startswith("refs/tags/"):
            sha = self.tags.get(rev.removeprefix("refs/tags/"))
        return self.commits.get(sha or rev)


def default_is_lfs(path: str, data: bytes) -> bool:
    """The Hub's usual ``.gitattributes``: weights by suffix, and anything large."""
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit

    def response(self) -> web.Response:
        headers = {"X-Error-Code": self.code, "X-Error-Message": self.message}
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return web.json_response({"error": self.message}, status=self.status, headers=headers)


class HubServer:
    """State and handlers of the hub and its CDN. Thread-safe; see the module doc."""

    def __init__(
        self,
        *,
        page_size: int = 1000,
        cdn: bool = False,
        tokens: Iterable[str] = (),
        require_auth: bool = False,
        cdn_rejects_auth: bool = True,
    ) -> None:
        self.page_size = page_size
        self.cdn_enabled = cdn
        self.tokens = set(tokens)
        self.require_auth = require_auth
        self.cdn_rejects_auth = cdn_rejects_auth
        self.base_url = ""
        self.cdn_url = ""
        self._lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._queued: dict[str, deque[Fault]] = {k: deque() for k in KINDS}
        self._sticky: dict[str, Fault] = {}
        self._log: list[tuple[str, Served]] = []
        self._counter = itertools.count(1)
        self._secret = b"cdn-signing-secret"

    # -- content ---------------------------------------------------------------------
    def create_repo(
        self, repo_id: str, *, private: bool = False, gitattributes: bool = True
    ) -> str:
        """A repo with an initial commit on ``main`` (holding ``.gitattributes`` like
        repos created on the Hub, unless ``gitattributes=False``); returns its sha."""
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo exists: {repo_id}")
            self._repos[repo_id] = Repo(repo_id=repo_id, private=private)
        files = {".gitattributes": GITATTRIBUTES} if gitattributes else {}
        return self.commit(repo_id, files, message="initial commit", lfs=())

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | None],
        *,
        branch: str = "main",
        lfs: Iterable[str] | None = None,
        message: str = "update",
        replace: bool = False,
    ) -> str:
        """Commit on ``branch`` (created if new, from the default branch) and move it.

        ``files`` maps paths to content (None deletes). ``lfs`` lists the paths stored as
        LFS; default: :func:`default_is_lfs`. ``replace`` drops files not listed.
        """
        for path in files:
            if not path or path.startswith("/") or ".." in path.split("/") or "\0" in path:
                raise ValueError(f"use hostile_commit for unsafe path {path!r}")
        lfs_set = None if lfs is None else set(lfs)

        def is_lfs(path: str, data: bytes) -> bool:
            return default_is_lfs(path, data) if lfs_set is None else path in lfs_set

        with self._lock:
            repo = self._repo(repo_id)
            parent_sha = repo.branches.get(branch) or repo.branches.get("main")
            parent = repo.commits.get(parent_sha) if parent_sha else None
            current = {} if parent is None or replace else {f.path: f for f in parent.files}
            for path, data in files.items():
                if data is None:
                    current.pop(path, None)
                else:
                    current[path] = HubFile.make(path, data, is_lfs(path, data))
            ordered = tuple(current[p] for p in sorted(current))
            return self._add_commit(repo, branch, ordered, message, parent_sha)

    def hostile_commit(
        self,
        repo_id: str,
        entries: Sequence[tuple[str, bytes]],
        *,
        branch: str = "main",
        lfs: bool = False,
        message: str = "hostile",
    ) -> str:
        """A commit holding exactly ``entries``, names unchecked, duplicates kept."""
        with self._lock:
            repo = self._repo(repo_id)
            parent_sha = repo.branches.get(branch)
            files = tuple(HubFile.make(p, d, lfs) for p, d in entries)
            return self._add_commit(repo, branch, files, message, parent_sha)

    def _add_commit(
        self, repo: Repo, branch: str, files: tuple[HubFile, ...], message: str, parent: str | None
    ) -> str:
        n = next(self._counter)
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"{repo.repo_id}\0{parent}\0{message}\0{n}\0".encode())
        for f in files:
            h.update(f.path.encode() + b"\0" + f.oid.encode() + b"\0")
        sha = h.hexdigest()
        repo.commits[sha] = Commit(sha, files, message, _EPOCH + n, parent)
        repo.branches[branch] = sha
        for f in files:
            if f.lfs:
                self._blobs[f.sha256] = f.data
        return sha

    def set_branch(self, repo_id: str, branch: str, rev: str) -> None:
        """Point ``branch`` at ``rev`` (a sha or another ref): a force-push."""
        with self._lock:
            repo = self._repo(repo_id)
            commit = repo.resolve(rev)
            if commit is None:
                raise KeyError(rev)
            repo.branches[branch] = commit.sha

    def tag(self, repo_id: str, tag: str, rev: str) -> None:
        with self._lock:
            repo = self._repo(repo_id)
            commit = repo.resolve(rev)
            if commit is None:
                raise KeyError(rev)
            repo.tags[tag] = commit.sha

    def head(self, repo_id: str, rev: str = "main") -> Commit:
        with self._lock:
            commit = self._repo(repo_id).resolve(rev)
        if commit is None:
            raise KeyError(rev)
        return commit

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """What a snapshot of ``rev`` holds, for comparing downloads byte for byte."""
        return {f.path: f.data for f in self.head(repo_id, rev).files}

    def _repo(self, repo_id: str) -> Repo:
        try:
            return self._repos[repo_id]
        except KeyError:
            raise KeyError(f"no repo {repo_id}") from None

    # -- faults and observation ------------------------------------------------------
    def fault(self, kind: str, *faults: Fault, times: int = 1) -> None:
        """Queue faults for the next requests of ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(kind)
        with self._lock:
            for f in faults:
                self._queued[kind].extend([f] * times)

    def always(self, kind: str, fault: Fault | None) -> None:
        with self._lock:
            if fault is None:
                self._sticky.pop(kind, None)
            else:
                self._sticky[kind] = fault

    def log(self, kind: str | None = None) -> list[Served]:
        """Requests so far (of one kind or all), each with the ``authorization`` it sent."""
        with self._lock:
            return [s for k, s in self._log if kind is None or k == kind]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _take_fault(self, kind: str, method: str) -> Fault | None:
        with self._lock:
            if kind in self._sticky:
                return self._sticky[kind]
            q = self._queued[kind]
            if q and method in q[0].methods:
                return q.popleft()
            return None

    # -- request handling ------------------------------------------------------------
    def _authorize(self, request: web.Request, repo_id: str) -> Repo:
        auth = request.headers.get("Authorization")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        if token is not None and token not in self.tokens:
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None or ((repo.private or self.require_auth) and token is None):
            status = 404 if token is not None else 401
            raise HubError(status, "RepoNotFound", "Repository not found")
        return repo

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """``org/name`` (or a legacy one-part id) from the start of the path segments."""
        with self._lock:
            known = set(self._repos)
        if len(parts) >= 2 and f"{parts[0]}/{parts[1]}" in known:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        if parts and parts[0] in known:
            return parts[0], parts[1:]
        if len(parts) >= 2:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        return parts[0] if parts else "", []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        segs = [unquote(s) for s in request.rel_url.raw_path.split("/")[1:]]
        record = new_record(request)
        kind = "other"
        try:
            if segs[:2] == ["api", "models"] and len(segs) > 2:
                repo_id, tail = self._split_repo(segs[2:])
                kind = {"": "info", "revision": "info", "tree": "tree", "refs": "refs"}.get(
                    tail[0] if tail else "", "other"
                )
                with self._lock:
                    self._log.append((kind, record))
                fault = self._take_fault(kind, request.method) if kind != "other" else None
                if fault is not None:
                    return await respond(request, Resource(data=b""), record, fault=fault)
                repo = self._authorize(request, repo_id)
                if kind == "info":
                    resp = self._info(request, repo, tail[1] if len(tail) > 1 else "main")
                elif kind == "tree" and len(tail) >= 2:
                    resp = self._tree(request, repo, tail[1], "/".join(tail[2:]))
                elif kind == "refs":
                    resp = self._refs(repo)
                else:
                    raise HubError(404, "NotFound", "no such API route")
                record.status = resp.status
                return resp
            repo_id, tail = self._split_repo(segs)
            if len(tail) >= 3 and tail[0] == "resolve":
                kind = "resolve"
                with self._lock:
                    self._log.append((kind, record))
                return await self._resolve(request, record, repo_id, tail[1], "/".join(tail[2:]))
            raise HubError(404, "NotFound", "not found")
        except HubError as e:
            if kind == "other":
                with self._lock:
                    self._log.append((kind, record))
            record.status = e.status
            return e.response()

    def _info(self, request: web.Request, repo: Repo, rev: str) -> web.Response:
        with self._lock:
            commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in commit.files:
            s: dict[str, object] = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        org = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        body = {
            "_id": hashlib.sha1(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files),
        }
        return web.json_response(body)

    def _refs(self, repo: Repo) -> web.Response:
        with self._lock:
            branches = dict(repo.branches)
            tags = dict(repo.tags)
        return web.json_response(
            {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                    for n, s in sorted(branches.items())
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s}
                    for n, s in sorted(tags.items())
                ],
                "converts": [],
            }
        )

    def _tree(self, request: web.Request, repo: Repo, rev: str, path: str) -> web.Response:
        with self._lock:
            commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        expand = request.query.get("expand", "").lower() in ("1", "true")
        entries = _tree_entries(commit, path.strip("/"), recursive, expand)
        if entries is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", commit.sha)
        offset = _decode_cursor(request.query.get("cursor"))
        size = max(1, min(self.page_size, 50 if expand else self.page_size))
        page = entries[offset : offset + size]
        headers = {}
        if offset + size < len(entries):
            nxt = request.url.update_query(cursor=_encode_cursor(offset + size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def _resolve(
        self, request: web.Request, record: Served, repo_id: str, rev: str, path: str
    ) -> web.StreamResponse:
        fault = self._take_fault("resolve", request.method)
        if fault is not None and (fault.status is not None or fault.redirect is not None):
            return await respond(request, Resource(data=b""), record, fault=fault)
        repo = self._authorize(request, repo_id)
        with self._lock:
            commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        f = commit.lookup(path)
        if f is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist", commit.sha)
        headers = {"X-Repo-Commit": commit.sha}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        if f.lfs and self.cdn_enabled:
            sig = hmac.new(self._secret, f.sha256.encode(), "sha256").hexdigest()
            location = f"{self.cdn_url}/lfs/{f.sha256}?sig={sig}&repo={repo_id}"
            record.status = 302
            return web.Response(
                status=302,
                text=f"Found. Redirecting to {location}",
                headers={**headers, "Location": location, "ETag": f'"{f.oid}"'},
            )
        etag = f'"{f.sha256}"' if f.lfs else f'"{f.oid}"'
        res = make_resource(f.data, etag=etag, last_modified=commit.date)
        return await respond(request, res, record, fault=fault, headers=headers)

    async def handle_cdn(self, request: web.Request) -> web.StreamResponse:
        record = new_record(request)
        with self._lock:
            self._log.append(("cdn", record))
        fault = self._take_fault("cdn", request.method)
        sha = request.match_info["sha256"]
        expected = hmac.new(self._secret, sha.encode(), "sha256").hexdigest()
        with self._lock:
            data = self._blobs.get(sha)
        if self.cdn_rejects_auth and "Authorization" in request.headers:
            record.status = 400
            return web.Response(
                status=400,
                text="InvalidArgument: Only one auth mechanism allowed; "
                "the signed URL and the Authorization header cannot both be used\n",
            )
        if data is None or not hmac.compare_digest(request.query.get("sig", ""), expected):
            record.status = 403
            return web.Response(status=403, text="AccessDenied\n")
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        res = make_resource(data, etag=f'"{md5}"')
        return await respond(request, res, record, fault=fault)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle, allow_head=False)
        app.router.add_head("/{tail:.*}", self.handle)
        return app

    def make_cdn_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/lfs/{sha256}", self.handle_cdn, allow_head=False)
        app.router.add_head("/lfs/{sha256}", self.handle_cdn)
        return app


def _tree_entries(
    commit: Commit, path: str, recursive: bool, expand: bool
) -> list[dict[str, object]] | None:
    prefix = f"{path}/" if path else ""
    files = [f for f in commit.files if f.path.startswith(prefix)]
    exact = commit.lookup(path) if path else None
    if path and not files:
        return None if exact is None else [_file_entry(exact, commit, expand)]
    dirs: dict[str, None] = {}
    out: list[dict[str, object]] = []
    for f in files:
        rel = f.path[len(prefix) :]
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = prefix + "/".join(parts[:i])
            if (recursive or i == 1) and d not in dirs and parts[i - 1]:
                dirs[d] = None
                out.append(_dir_entry(d, commit))
        if recursive or len(parts) == 1:
            out.append(_file_entry(f, commit, expand))
    return sorted(out, key=lambda e: (str(e["path"]), e["type"] != "directory"))


def _file_entry(f: HubFile, commit: Commit, expand: bool) -> dict[str, object]:
    e: dict[str, object] = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path}
    if f.lfs:
        e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
    if expand:
        e["lastCommit"] = {"id": commit.sha, "title": commit.message, "date": _iso(commit.date)}
    return e


def _dir_entry(path: str, commit: Commit) -> dict[str, object]:
    oid = hashlib.sha1(f"tree\0{commit.sha}\0{path}".encode(), usedforsecurity=False).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    return int(json.loads(raw)["o"])


@contextmanager
def hub_server(
    host: str = LOOPBACK, cdn_host: str = CDN_HOST, **kwargs: object
) -> Iterator[HubServer]:
    """A :class:`HubServer` (and its CDN when ``cdn=True``) served from threads.

    ``hub.base_url`` is what ``HF_ENDPOINT`` should be; ``hub.cdn_url`` is the CDN, on
    another loopback address by default so it is another host by any comparison.
    """
    hub = HubServer(**kwargs)  # type: ignore[arg-type]
    with AppThread(hub.make_app(), host=host, name="hf-hub") as main:
        hub.base_url = main.url
        if not hub.cdn_enabled:
            yield hub
            return
        with AppThread(hub.make_cdn_app(), host=cdn_host, name="hf-cdn") as cdn:
            hub.cdn_url = cdn.url
            yield hub
