"""nginx on loopback: ranges, validators, TLS from a test CA, redirect locations."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import trustme

from tests.servers.net import fetch, tls_client_context
from tests.servers.nginx import NginxServer, ServedDir


def test_serves_ranges_and_validators(nginx_dir: ServedDir) -> None:
    data = os.urandom(1 << 20)
    (nginx_dir.path / "shard.safetensors").write_bytes(data)
    full = fetch(nginx_dir.url("shard.safetensors"))
    assert full.status == 200 and full.body == data
    etag, modified = full.headers["ETag"], full.headers["Last-Modified"]

    part = fetch(nginx_dir.url("shard.safetensors"), headers={"Range": "bytes=1000-"})
    assert part.status == 206 and part.body == data[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"

    same = fetch(
        nginx_dir.url("shard.safetensors"), headers={"Range": "bytes=0-9", "If-Range": etag}
    )
    assert same.status == 206 and same.body == data[:10]
    stale = fetch(
        nginx_dir.url("shard.safetensors"), headers={"Range": "bytes=0-9", "If-Range": '"x"'}
    )
    assert stale.status == 200 and len(stale.body) == len(data)
    assert fetch(nginx_dir.url("shard.safetensors"), headers={"If-None-Match": etag}).status == 304
    assert modified.endswith("GMT")
    assert fetch(nginx_dir.url("missing")).status == 404


def test_tls_and_redirects(
    nginx_factory: Callable[..., NginxServer], tmp_path: Path, tls_ca: trustme.CA
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.bin").write_bytes(b"abc")
    plain = nginx_factory(root)
    srv = nginx_factory(
        root,
        tls=tls_ca,
        redirects={
            "/to-plain": plain.url("a.bin"),
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        },
    )
    assert srv.base_url.startswith("https://127.0.0.1:")
    ctx = tls_client_context(tls_ca.cert_pem.bytes())
    assert fetch(srv.url("a.bin"), tls=ctx).body == b"abc"
    hop = fetch(srv.url("to-plain"), tls=ctx)
    assert hop.status == 302 and hop.headers["Location"] == plain.url("a.bin")
    meta = fetch(srv.url("to-metadata"), tls=ctx)
    assert meta.headers["Location"].startswith("http://169.254.169.254/")
    assert any("/to-plain" in line for line in srv.requests())
    srv.stop()
    assert not srv.process.alive() and srv.process.popen is not None
    assert srv.process.popen.returncode == 0, "nginx exits cleanly on SIGTERM"


def test_basic_auth_refuses_what_it_does_not_know(
    nginx_factory: Callable[..., NginxServer], tmp_path: Path
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.bin").write_bytes(b"private bytes")
    srv = nginx_factory(root, users={"alice": "s3cret"})
    assert srv.users == {"alice": "s3cret"}
    assert fetch(srv.url("a.bin")).status == 401
    wrong = "Basic " + base64.b64encode(b"alice:nope").decode()
    assert fetch(srv.url("a.bin"), headers={"Authorization": wrong}).status == 401
    right = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    assert fetch(srv.url("a.bin"), headers=right).body == b"private bytes"
    ranged = fetch(srv.url("a.bin"), headers={**right, "Range": "bytes=8-"})
    assert ranged.status == 206 and ranged.body == b"bytes"
