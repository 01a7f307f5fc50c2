"""Pulls through the whole agent (admin API -> puller -> fetch engine -> store) from real
HTTP servers on loopback: nginx as production serves files, and the fault-injecting server
for resets, short bodies, 503 storms and wrong ranges."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
import trustme

from agent.settings import EgressSettings, FetchSettings
from tests.servers.agent import InProcessAgent, agent_settings
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.nginx import NginxServer, ServedDir

MiB = 1024 * 1024


def tree_of(agent: InProcessAgent, key: str) -> Path:
    manifest = agent.deps.store.manifest(key)
    assert manifest is not None, f"model {key} has no manifest"
    return agent.deps.store.tree_path(manifest)  # type: ignore[no-any-return]


def assert_store_consistent(store_root: Path) -> None:
    """Every blob is named by its blake3; nothing partial is visible under models/."""
    for shard in (store_root / "blobs").iterdir():
        for blob in shard.iterdir():
            assert blake3.blake3(blob.read_bytes()).hexdigest() == blob.name
            assert blob.stat().st_mode & 0o222 == 0, "a committed blob must be read-only"
    for model in (store_root / "models").iterdir():
        names = {p.name for p in model.iterdir()}
        assert names <= {"manifest.json"} | {n for n in names if n.startswith("t-")}


def fast_settings(tmp_path: Path, **fetch: object) -> object:
    f = replace(FetchSettings(), retries=4, backoff_base=0.01, backoff_max=0.05, **fetch)
    return agent_settings(tmp_path, fetch=f)


async def test_archive_model_is_pulled_byte_identical(tmp_path: Path, nginx_dir: ServedDir
                                                      ) -> None:
    files = {
        "config.json": b'{"hidden_size": 64}',
        "tokenizer/vocab.json": b'{"a": 1}',
        "model-00001-of-00002.safetensors": os.urandom(3 * MiB + 7),
        "model-00002-of-00002.safetensors": os.urandom(2 * MiB),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (nginx_dir.path / "model.tar.gz").write_bytes(buf.getvalue())
    (nginx_dir.path / "weights.safetensors").write_bytes(files["model-00001-of-00002.safetensors"])

    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(nginx_dir.url("model.tar.gz"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert sorted(f["path"] for f in model["files"]) == sorted(files)
        tree = tree_of(agent, model["key"])
        for name, data in files.items():
            assert (tree / name).read_bytes() == data
        # a plain file whose content is already stored costs no new blob
        single = await client.ensure(nginx_dir.url("weights.safetensors"))
        single = await client.model(single["key"], wait=30)
        assert single["state"] == "ready", single["error"]
        blob = single["files"][0]["blake3"]
        shard = next(f for f in model["files"] if f["path"].startswith("model-00001"))
        assert blob == shard["blake3"]
        store = await client.store()
        assert store["blobs"] == len(files)
        assert store["dedup_saved_bytes"] == len(files["model-00001-of-00002.safetensors"])
    assert_store_consistent(tmp_path / "store")


async def test_resume_after_the_connection_drops(tmp_path: Path, faulty: FaultyServer) -> None:
    data = os.urandom(6 * MiB + 123)
    faulty.add("/m.bin", data)
    faulty.fault("/m.bin", Fault(close_after=2 * MiB + 5, methods=("GET",)))
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == data
    gets = faulty.gets("/m.bin")
    assert len(gets) == 2
    assert gets[1].range == f"bytes={2 * MiB + 5}-{len(data) - 1}"
    assert faulty.bytes_sent_twice("/m.bin") == 0, "bytes already on disk were fetched again"


@pytest.mark.parametrize("fault", [
    Fault(reset_after=MiB, methods=("GET",)),
    Fault(close_after=10, methods=("GET",)),
    Fault(status=503, retry_after=0, methods=("GET",)),
    Fault(wrong_content_range=512, methods=("GET",)),
], ids=["reset", "short-body", "503", "wrong-content-range"])
async def test_transient_faults_are_recovered(tmp_path: Path, faulty: FaultyServer,
                                              fault: Fault) -> None:
    data = os.urandom(3 * MiB)
    faulty.add("/m.bin", data)
    faulty.fault("/m.bin", fault, times=3)
    settings = fast_settings(tmp_path, segment_min_bytes=MiB, connections_per_file=3)
    async with InProcessAgent(settings) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == data
    assert_store_consistent(tmp_path / "store")


async def test_a_refused_url_is_renewed_again_after_progress(tmp_path: Path,
                                                            faulty: FaultyServer) -> None:
    """A long pull outlives its signed URL more than once (a CDN's or a presigned S3 URL
    expires each hour; each reconnect then gets 403): it is renewed each time it was
    refused after bytes came through, and fails only when renewing does not help."""
    data = os.urandom(4 * MiB)
    faulty.add("/m.bin", data)
    expired = Fault(status=403, methods=("GET",))
    faulty.fault("/m.bin", Fault(close_after=MiB, methods=("GET",)), expired,
                 Fault(close_after=MiB, methods=("GET",)), expired)
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == data
    assert [g.status for g in faulty.gets("/m.bin")] == [206, 403, 206, 403, 206]
    assert faulty.bytes_sent_twice("/m.bin") == 0

    faulty.clear_faults()
    faulty.always("/m.bin", expired)
    async with InProcessAgent(fast_settings(tmp_path / "again")) as agent, \
            agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "failed" and "access denied (403)" in model["error"]


async def test_https_source_signed_by_a_private_ca(
        tmp_path: Path, nginx_factory: Callable[..., NginxServer]) -> None:
    """An in-cluster mirror whose certificate a private CA signed. Without that CA the pull
    fails at once (a certificate does not fix itself: not retried), saying what to do; with
    it (caFile) the HEAD and the ranged GETs go over TLS, verified against it, host name
    included, whether the URL names the host or its address."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "root").mkdir()
    data = os.urandom(5 * MiB + 3)
    (tmp_path / "root" / "m.bin").write_bytes(data)
    server = nginx_factory(tmp_path / "root", tls=ca)
    hosts = ("127.0.0.1", "localhost")

    untrusting = agent_settings(tmp_path / "a", egress=EgressSettings(allow_hosts=hosts))
    async with InProcessAgent(untrusting) as agent, agent.client() as client:
        model = await client.ensure(server.url("m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "failed"
        assert "the server's TLS certificate is not trusted" in model["error"]
        assert "caFile" in model["error"] and "after" not in model["error"]  # not retried
        assert 'modelcache_pull_failures_total{reason="tls"} 1.0' in await client.metrics()
    assert not [r for r in server.requests() if "m.bin" in r], \
        "nothing was asked of a server it does not trust"

    trusting = agent_settings(tmp_path / "b", egress=EgressSettings(
        allow_hosts=hosts, ca_file=tmp_path / "ca.pem"),
        fetch=replace(FetchSettings(), segment_min_bytes=MiB))
    async with InProcessAgent(trusting) as agent, agent.client() as client:
        for url in (server.url("m.bin"), f"https://localhost:{server.port}/m.bin"):
            model = await client.ensure(url)
            model = await client.model(model["key"], wait=30)
            assert model["state"] == "ready", model["error"]
            assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == data
    assert any(line.startswith("GET /m.bin") for line in server.requests())


async def test_a_503_storm_that_does_not_end_fails_clearly(tmp_path: Path,
                                                           faulty: FaultyServer) -> None:
    faulty.add("/m.bin", os.urandom(MiB))
    faulty.always("/m.bin", Fault(status=503, retry_after=0, methods=("GET",)))
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "failed"
        assert "503" in model["error"] and "giving up after 4 attempts" in model["error"]
        key = model["key"]
        assert not (tmp_path / "store" / "models" / key / "manifest.json").exists()
        text = await client.metrics()
        assert 'modelcache_pull_failures_total{reason="transient"} 1.0' in text
    assert len(faulty.gets("/m.bin")) == 4


async def test_twenty_concurrent_requests_download_each_file_once(
        tmp_path: Path, faulty: FaultyServer) -> None:
    data = os.urandom(4 * MiB)
    faulty.add("/m.bin", data)
    settings = fast_settings(tmp_path, segment_min_bytes=MiB, connections_per_file=4)
    async with InProcessAgent(settings) as agent, agent.client() as client:
        replies = await asyncio.gather(*(client.ensure(faulty.url("/m.bin")) for _ in range(20)))
        assert len({r["key"] for r in replies}) == 1
        model = await client.model(replies[0]["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        text = await client.metrics()
    assert faulty.bytes_sent("/m.bin") == len(data)
    assert faulty.bytes_sent_twice("/m.bin") == 0
    assert len(faulty.gets("/m.bin")) == 1, "a fast stream is not split: one GET, once"
    assert 'modelcache_cache_requests_total{result="miss"} 1.0' in text


async def test_a_server_that_ignores_ranges_is_fetched_over_one_connection(
        tmp_path: Path, faulty: FaultyServer) -> None:
    data = os.urandom(4 * MiB)
    faulty.add("/m.bin", data)
    faulty.always("/m.bin", Fault(ignore_range=True, methods=("GET",)))
    settings = fast_settings(tmp_path, segment_min_bytes=MiB, connections_per_file=4,
                             split_interval=0.05, split_below_rate=1 << 40)
    async with InProcessAgent(settings) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == data


async def test_a_file_changed_at_the_source_mid_pull_is_not_committed(
        tmp_path: Path, faulty: FaultyServer) -> None:
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    faulty.add("/m.bin", old, etag='"v1"')
    faulty.fault("/m.bin", Fault(close_after=MiB, methods=("GET",)))
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/m.bin"))
        await asyncio.to_thread(faulty.wait_for, lambda s: len(s.gets("/m.bin")) >= 1)
        faulty.add("/m.bin", new, etag='"v2"')
        model = await client.model(model["key"], wait=30)
        if model["state"] == "ready":  # the first attempt finished before the change
            assert (tree_of(agent, model["key"]) / "m.bin").read_bytes() == old
        else:
            assert "changed at the source" in model["error"]
    assert_store_consistent(tmp_path / "store")
    blobs = {p.name for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    mixed = blake3.blake3(old[:MiB] + new[MiB:]).hexdigest()
    assert mixed not in blobs, "a file mixing two versions was committed"


async def test_redirects_to_unallowed_addresses_are_refused(
        tmp_path: Path, nginx_factory: object, faulty: FaultyServer) -> None:
    faulty.add("/real.bin", os.urandom(1000))
    server = nginx_factory(tmp_path / "www", redirects={  # type: ignore[operator]
        "/meta.bin": "http://169.254.169.254/latest/meta-data/",
        "/loop.bin": faulty.url("/real.bin").replace("127.0.0.1", "127.0.0.2"),
    })
    nginx_host = f"127.0.0.1:{server.port}"
    settings = agent_settings(tmp_path, egress=EgressSettings(allow_hosts=(nginx_host,)))
    async with InProcessAgent(settings) as agent, agent.client() as client:
        for path, words in (("/meta.bin", "link-local address 169.254.169.254"),
                            ("/loop.bin", "loopback address 127.0.0.2")):
            model = await client.ensure(f"http://{nginx_host}{path}")
            model = await client.model(model["key"], wait=30)
            assert model["state"] == "failed"
            assert words in model["error"] and "--allow-host" in model["error"]
    assert faulty.gets("/real.bin") == []


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


HOSTILE = {
    "dotdot": ([_member("../escape.txt")], "contains '..'"),
    "absolute": ([_member("/etc/escape.txt")], "is an absolute path"),
    "symlink": ([_member("link", kind=tarfile.SYMTYPE, link="/etc/passwd")], "is a link"),
    "symlink-then-write": ([_member("d", kind=tarfile.SYMTYPE, link="/tmp"),
                            _member("d/escape.txt")], "is a link"),
    "hardlink": ([_member("h", kind=tarfile.LNKTYPE, link="/etc/shadow")], "is a link"),
    "device": ([_member("dev", kind=tarfile.CHRTYPE)], "is a device or FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archives_are_refused(tmp_path: Path, nginx_dir: ServedDir,
                                            case: str) -> None:
    members, words = HOSTILE[case]
    (nginx_dir.path / f"{case}.tar").write_bytes(_tar([_member("ok.txt"), *members]))
    before = set(tmp_path.parent.iterdir())
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(nginx_dir.url(f"{case}.tar"))
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "failed"
        assert words in model["error"], model["error"]
        assert not (tmp_path / "store" / "models" / model["key"] / "manifest.json").exists()
    assert set(tmp_path.parent.iterdir()) == before, "something was written beside the test"
    assert not list((tmp_path / "store").rglob("escape.txt"))
    assert not list((tmp_path / "store" / "partial").iterdir())


@pytest.mark.slow
async def test_a_decompression_bomb_is_stopped_while_it_inflates(
        tmp_path: Path, nginx_dir: ServedDir) -> None:
    import gzip

    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 1 << 30
        tar.addfile(info, _Zeros(1 << 30))
    (nginx_dir.path / "bomb.tar.gz").write_bytes(raw.getvalue())
    async with InProcessAgent(fast_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(nginx_dir.url("bomb.tar.gz"))
        model = await client.model(model["key"], wait=60)
        assert model["state"] == "failed"
        assert "decompression bomb" in model["error"]
    written = sum(p.stat().st_size for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert written < 64 * MiB


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


async def test_file_sources_only_under_allowed_paths(tmp_path: Path) -> None:
    seed = tmp_path / "seed" / "llama"
    (seed / "sub").mkdir(parents=True)
    (seed / "config.json").write_text("{}")
    (seed / "sub" / "w.safetensors").write_bytes(os.urandom(MiB))
    (tmp_path / "secret").write_text("node file")
    settings = agent_settings(tmp_path, egress=EgressSettings(
        allow_hosts=("127.0.0.1",), allow_paths=(tmp_path / "seed",)))
    async with InProcessAgent(settings) as agent, agent.client() as client:
        model = await client.ensure(f"file://{seed}", include=["*.safetensors"])
        model = await client.model(model["key"], wait=30)
        assert model["state"] == "ready", model["error"]
        assert [f["path"] for f in model["files"]] == ["sub/w.safetensors"]
        tree = tree_of(agent, model["key"])
        assert (tree / "sub" / "w.safetensors").read_bytes() == \
            (seed / "sub" / "w.safetensors").read_bytes()
        from agent.cli.client import AgentError

        with pytest.raises(AgentError) as refused:
            await client.ensure(f"file://{tmp_path}/secret")
        assert refused.value.status == 403
        assert "--allow-path" in str(refused.value)
