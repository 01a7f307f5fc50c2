"""``s3://BUCKET[/PREFIX]``: the objects under a prefix of any S3-compatible store (AWS,
MinIO, Ceph, SeaweedFS), or one object.

botocore does what is easy to get subtly wrong and is its job: SigV4 signing, the standard
credential chain (static keys from the credentials' ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, else the agent's environment, profile,
web identity (IRSA, pod identity) or instance role), endpoint and addressing rules
(``SourceSettings.s3_addressing``: ``path``, ``virtual``, or ``auto`` = path-style for a
custom endpoint such as ``AWS_ENDPOINT_URL``), request serialization and XML parsing. No
credentials anywhere: requests go unsigned (public buckets).

**Control plane through** :class:`~agent.sources.control.Control`. botocore signs each
request (ListObjectsV2, HeadObject) and hands it to a ``before-send`` hook instead of its own
urllib3 stack; the hook sends it through ``Control`` and gives botocore the reply to parse.
So every control request passes the egress policy exactly like every other source's (DNS
answers checked and pinned, every redirect hop checked, loopback/link-local/private refused
unless allowed) and is retried with the same jittered backoff that honours ``Retry-After``;
botocore's own retries are off. The alternative, botocore's transport with an egress check
bolted onto urllib3, would be a second, weaker implementation of the policy. botocore is
synchronous, so its calls run in worker threads; the hook hops back to the event loop.
(Fetching credentials themselves, e.g. from STS or the instance metadata service, stays
with botocore: that is the platform's identity, not a model source.)

**Data plane: presigned GET URLs** (``locate``), so the bytes go through the one fetch
engine (parallel ranged reads, resume, verification); ``locate(refresh=True)`` after a
401/403 signs a fresh URL. URLs live one hour; a pull that takes longer is re-signed
whenever a request is refused.

**Revision and integrity.** The revision is a digest of the listing's keys, sizes and ETags:
an ETag is a change detector, not proof of content. Proof is ``x-amz-checksum-sha256`` when
the object has one: it is read with ``HeadObject`` + ``ChecksumMode=ENABLED`` and verified in
the same pass as blake3 (and lets the store skip content it already holds). What is cheap:
ListObjectsV2 says which checksum algorithm an object has (``ChecksumAlgorithm``, on AWS and
moto) but not its value, and no S3 call returns the values in bulk; so only objects listed
with ``SHA256`` are asked, one HEAD each, in parallel; a store whose listing never names
algorithms (SeaweedFS, older MinIO/Ceph) has every object asked (up to
:data:`MAX_CHECKSUM_PROBES`). HEAD rather than GetObjectAttributes: the latter needs a
separate IAM permission (``s3:GetObjectAttributes``) a read-only role often lacks, and
SeaweedFS leaves the checksum out of its answer. A composite checksum (multipart uploads:
``<base64>-<parts>``, ``ChecksumType: COMPOSITE``) is a digest of part digests, not of the
object, and is not used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.session
from botocore import UNSIGNED
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from agent.egress import shown_url
from agent.settings import SourceSettings
from agent.sources.base import Credentials, Location, RemoteFile, Resolved
from agent.sources.control import Control
from agent.store.names import check_unique, safe_relpath
from common.errors import (
    ModelcacheError,
    SourceAuthError,
    SourceError,
    SourceNotFound,
)
from common.reference import Reference

T = TypeVar("T")
MAX_OBJECTS = 100_000
MAX_CHECKSUM_PROBES = 1_000
PROBE_CONCURRENCY = 8
PRESIGN_SECONDS = 3600
MAX_CLIENTS = 16
#: statuses handed back to botocore to parse (its error codes are more telling than ours);
#: 408, 429 and 5xx are retried by Control first
_PARSED = tuple(s for s in range(200, 500) if s not in (301, 302, 303, 307, 308, 408, 429))
_AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidSecurity", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
})
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound", "404"})
_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop] = contextvars.ContextVar("s3_loop")


@dataclass(frozen=True)
class S3Object(RemoteFile):
    """A model file that is an S3 object (``locate`` presigns a GET for it)."""

    bucket: str = ""
    key: str = ""


@dataclass(frozen=True)
class _Listed:
    key: str
    size: int
    etag: str
    algorithms: tuple[str, ...]


class S3Source:
    schemes: tuple[str, ...] = ("s3",)
    #: keys per ListObjectsV2 page (S3's own maximum is 1000)
    page_size: int = 1000

    def __init__(self, control: Control, settings: SourceSettings) -> None:
        self.control = control
        self.endpoint = settings.s3_endpoint or None
        self.region = settings.s3_region or "us-east-1"
        style = settings.s3_addressing
        if style not in ("auto", "path", "virtual"):
            raise SourceError(f"S3 addressing style {style!r} is not path, virtual or auto")
        if style == "auto":
            style = "path" if self.endpoint else "auto"
        self.addressing = style
        self._session = botocore.session.Session()
        self._clients: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()  # botocore sessions are not thread-safe

    # --- the Source protocol -------------------------------------------------------------

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        bucket, prefix = ref.host, ref.path
        client = await self._client(credentials)
        listed = await self._call(bucket, self._list, client, bucket, prefix)
        base = f"{prefix}/" if prefix else ""
        if not listed and prefix:  # s3://bucket/path/to/one.safetensors
            one = await self._call(bucket, self._head, client, bucket, prefix)
            if one is not None:
                listed, base = [one], prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        if not listed:
            raise SourceNotFound(f"{ref.display}: no objects under this prefix")
        paths = [safe_relpath(obj.key[len(base):], what=f"s3://{bucket} object key")
                 for obj in listed]
        check_unique(paths, what=f"s3://{bucket} object key")
        sha256 = await self._checksums(client, bucket, listed)
        urls = await self._call(bucket, lambda: [self._object_url(client, bucket, obj.key)
                                                 for obj in listed])
        files = [S3Object(path=path, url=url, size=obj.size, sha256=sha256.get(obj.key),
                          etag=obj.etag, bucket=bucket, key=obj.key)
                 for path, url, obj in zip(paths, urls, listed, strict=True)]
        return Resolved(ref, _revision(listed), tuple(files))

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        if not isinstance(file, S3Object):
            raise SourceError(f"{shown_url(file.url)} is not an S3 object of this source")
        client = await self._client(credentials)
        url = await self._call(file.bucket, self._presign, client, file.bucket, file.key)
        return Location(url)

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        client = await self._client(credentials)
        prefix = f"{ref.path}/" if ref.path else ""
        await self._call(ref.host, lambda: client.list_objects_v2(
            Bucket=ref.host, Prefix=prefix, MaxKeys=1))

    async def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
        await self.control.close()

    # --- botocore, in worker threads -----------------------------------------------------

    async def _call(self, bucket: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking botocore call in a thread; translate its errors."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            _LOOP.set(loop)  # for the send hook (the thread runs in a copy of our context)
            return fn(*args)

        try:
            return await asyncio.to_thread(run)
        except ModelcacheError:
            raise
        except ClientError as e:
            raise _client_error(bucket, e) from e
        except NoCredentialsError as e:
            raise SourceAuthError(f"s3://{bucket}: no AWS credentials could be found") from e
        except BotoCoreError as e:
            raise SourceError(f"s3://{bucket}: {e}") from e

    async def _client(self, credentials: Credentials | None) -> Any:
        keys = _static_keys(credentials)
        ident = "chain" if keys is None else hashlib.sha256("\0".join(keys).encode()).hexdigest()
        with self._lock:
            client = self._clients.get(ident)
            if client is not None:
                self._clients.move_to_end(ident)
                return client
        client = await asyncio.to_thread(self._make_client, keys)
        with self._lock:
            self._clients[ident] = client
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)[1].close()
        return client

    def _make_client(self, keys: tuple[str, str, str] | None) -> Any:
        with self._session_lock:
            return self._create_client(keys)

    def _create_client(self, keys: tuple[str, str, str] | None) -> Any:
        signed = keys is not None or self._session.get_credentials() is not None
        config = Config(
            signature_version="s3v4" if signed else UNSIGNED,
            s3={"addressing_style": self.addressing},
            retries={"total_max_attempts": 1, "mode": "standard"},
            user_agent_extra="modelcache",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        access, secret, token = keys or (None, None, None)
        client = self._session.create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint, config=config,
            aws_access_key_id=access, aws_secret_access_key=secret,
            aws_session_token=token or None)
        client.meta.events.register("before-send.s3", self._send)
        return client

    def _send(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        """botocore's transport, replaced: the signed request goes through Control."""
        headers = {k: v.decode() if isinstance(v, bytes) else str(v)
                   for k, v in request.headers.items()}
        headers["Accept-Encoding"] = "identity"
        body = request.body if isinstance(request.body, bytes) and request.body else None
        future = asyncio.run_coroutine_threadsafe(
            self.control.request(str(request.method), str(request.url), headers=headers,
                                 data=body, ok=_PARSED),
            _LOOP.get())
        reply = future.result()
        return AWSResponse(reply.url, reply.status, dict(reply.headers), _Body(reply.body))

    def _list(self, client: Any, bucket: str, prefix: str) -> list[_Listed]:
        out: list[_Listed] = []
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "",
            PaginationConfig={"PageSize": self.page_size})
        for page in pages:
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                if key.endswith("/") and obj["Size"] == 0:
                    continue  # a "directory" marker
                out.append(_Listed(key, int(obj["Size"]), str(obj.get("ETag", "")),
                                   tuple(obj.get("ChecksumAlgorithm", ()))))
                if len(out) > MAX_OBJECTS:
                    raise SourceError(
                        f"s3://{bucket}/{prefix}: more than {MAX_OBJECTS} objects; "
                        "name a narrower prefix")
        return out

    def _head(self, client: Any, bucket: str, key: str) -> _Listed | None:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                return None
            raise
        return _Listed(key, int(head["ContentLength"]), str(head.get("ETag", "")), ())

    def _checksum(self, client: Any, bucket: str, key: str) -> str | None:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return _full_object_sha256(head.get("ChecksumSHA256"), head.get("ChecksumType"))

    async def _checksums(self, client: Any, bucket: str, listed: list[_Listed]
                         ) -> dict[str, str]:
        """key -> hex sha256, for the objects that carry a full-object SHA256 checksum."""
        reported = any(obj.algorithms for obj in listed)
        probe = [o for o in listed if "SHA256" in o.algorithms] if reported else listed
        probe = probe[:MAX_CHECKSUM_PROBES]
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def one(obj: _Listed) -> tuple[str, str | None]:
            async with limit:
                return obj.key, await self._call(bucket, self._checksum, client, bucket,
                                                 obj.key)

        found = await asyncio.gather(*(one(o) for o in probe))
        return {key: digest for key, digest in found if digest}

    def _presign(self, client: Any, bucket: str, key: str) -> str:
        return str(client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS))

    def _object_url(self, client: Any, bucket: str, key: str) -> str:
        """The object's URL without a signature (for names, messages and partial ids)."""
        return shown_url(self._presign(client, bucket, key))


class _Body:
    """What botocore reads a response body from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> list[bytes]:
        return [self._data]

    def read(self, amt: int | None = None) -> bytes:
        data, self._data = self._data, b""
        return data


def _static_keys(credentials: Credentials | None) -> tuple[str, str, str] | None:
    """(access key, secret key, session token) from a credentials mapping, if it has them."""
    if not credentials:
        return None
    creds = {k.upper(): v.strip() for k, v in credentials.items()}
    access, secret = creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY")
    if not access and not secret:
        return None
    if not access or not secret:
        raise SourceAuthError(
            "the credentials hold only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return access, secret, creds.get("AWS_SESSION_TOKEN", "")


def _full_object_sha256(value: Any, kind: Any) -> str | None:
    """Hex sha256 from a base64 ``x-amz-checksum-sha256``, unless it is composite."""
    if not isinstance(value, str) or "-" in value or kind not in (None, "FULL_OBJECT"):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _revision(listed: list[_Listed]) -> str:
    h = hashlib.sha256()
    for obj in sorted(listed, key=lambda o: o.key):
        h.update(f"{obj.key}\0{obj.size}\0{obj.etag}\n".encode())
    return "etags:" + h.hexdigest()[:32]


def _client_error(bucket: str, e: ClientError) -> ModelcacheError:
    error = e.response.get("Error", {})
    code = str(error.get("Code", "")) or "unknown"
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _AUTH_CODES or status in (401, 403):
        return SourceAuthError(
            f"s3://{bucket}: access denied ({code}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket policy")
    if code in _NOT_FOUND_CODES or status == 404:
        return SourceNotFound(f"s3://{bucket}: not found ({code})")
    message = str(error.get("Message", ""))[:200]
    return SourceError(f"s3://{bucket}: the store answered {code}: {message}")
