"""``hf://`` against the local Hugging Face hub (proven faithful by the real
``huggingface_hub`` client in ``tests/servers/test_hfhub.py``), through the real pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.cli.client import AgentClient
from agent.egress import Egress
from agent.index import FAILED
from agent.settings import EgressSettings, SourceSettings
from agent.sources.control import Control
from agent.sources.hf import HfSource
from common.errors import SourceAuthError, SourceError
from common.reference import parse
from tests.servers.agent import AgentProcess
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.hfhub import HubServer
from tests.sources.conftest import (
    LOOPBACK_HOSTS,
    TEST_FETCH,
    PipelineFactory,
    files_named,
    read_tree,
)


def model_files(n: int = 0) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "test", "rev": %d}' % n,
        "model-00001-of-00002.safetensors": os.urandom(2_500_000),
        "model-00002-of-00002.safetensors": os.urandom(150_000),
        "tokenizer/vocab.json": b'{"a": 1, "b": 2}',
        "tokenizer/merges.txt": b"a b\n",
    }


def hub_settings(hub: HubServer) -> SourceSettings:
    return SourceSettings(hf_endpoint=hub.base_url)


async def test_repo_pulled_byte_identical_over_pages(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hub = hf_hub  # three entries per tree page
    hub.create_repo("org/m")
    sha = hub.commit("org/m", model_files())
    hub.always("resolve", Fault(rate=8 * 1024 * 1024))  # slow enough to be split
    fetch = replace(TEST_FETCH, split_below_rate=1 << 40, split_interval=0.02,
                    buffer_bytes=64 * 1024)
    p = await pipeline(sources=hub_settings(hub), fetch=fetch)

    model = await p.pull("hf://org/m")

    assert p.tree(model) == hub.files("org/m")
    assert model.manifest is not None and model.manifest.revision == sha
    assert len(hub.log("tree")) >= 3, "the listing was paginated"
    lfs = {f.path: f.sha256 for f in model.manifest.files if f.sha256}
    assert set(lfs) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for path, digest in lfs.items():
        assert digest == hashlib.sha256(hub.files("org/m")[path]).hexdigest()
    big = [r for r in hub.log("resolve") if r.path.endswith("00001-of-00002.safetensors")]
    assert len(big) >= 2 and any(r.range for r in big), "a shard was split into ranged parts"


async def test_commit_sha_is_pinned_without_asking_for_the_revision(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hf_hub.create_repo("org/m")
    first = hf_hub.commit("org/m", model_files(1))
    hf_hub.commit("org/m", {"config.json": b"{}"})
    p = await pipeline(sources=hub_settings(hf_hub))

    model = await p.pull(f"hf://org/m@{first}", include=["config.json"])

    assert p.tree(model) == {"config.json": hf_hub.files("org/m", first)["config.json"]}
    assert not hf_hub.log("info"), "an immutable commit needs no revision lookup"


async def test_private_repo_token_from_credentials_dropped_at_the_cdn(
    hf_hub_factory: Callable[..., HubServer], pipeline: PipelineFactory
) -> None:
    hub = hf_hub_factory(cdn=True, tokens={"hf_secret"}, page_size=2)
    hub.create_repo("org/private", private=True)
    hub.commit("org/private", model_files())
    p = await pipeline(sources=hub_settings(hub))

    denied = await p.pull("hf://org/private", ok=False)
    assert denied.state == FAILED
    assert denied.error is not None and "401" in denied.error and "credentials" in denied.error

    hub.reset_log()
    model = await p.pull("hf://org/private", include=["*"], credentials={"token": "hf_secret"})

    assert p.tree(model) == hub.files("org/private")
    api = hub.log("tree") + hub.log("info") + hub.log("resolve")
    assert api and all(r.authorization == "Bearer hf_secret" for r in api)
    cdn = [r for r in hub.log("cdn") if r.method == "GET"]
    assert cdn and all(r.status in (200, 206) for r in cdn)
    assert all(r.authorization is None for r in cdn), "the token must not reach the CDN"
    assert "hf_secret" not in str(model.to_json())
    source = p.sources["hf"]
    await source.check_access(parse("hf://org/private"), {"token": "hf_secret"})
    with pytest.raises(SourceAuthError):
        await source.check_access(parse("hf://org/private"), None)


async def test_corrupted_lfs_bytes_fail_and_commit_nothing(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hf_hub.create_repo("org/m", gitattributes=False)
    hf_hub.commit("org/m", {"model.safetensors": os.urandom(300_000)})
    hf_hub.always("resolve", Fault(corrupt_at=200_000))
    p = await pipeline(sources=hub_settings(hf_hub))

    model = await p.pull("hf://org/m", ok=False)

    assert model.state == FAILED and model.error is not None
    assert "sha256" in model.error and "model.safetensors" in model.error
    assert p.blob_count() == 0, "nothing unverified is committed"
    assert not list(p.store.partial.iterdir()), "the corrupt partial is removed"
    assert not list((p.store.models / model.key).glob("t-*"))


async def test_corrupted_git_file_fails_on_its_git_blob_id(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    """A file kept in git (no LFS sha256) is checked against the tree's git oid: a mirror
    serving other bytes of the same size is caught, and nothing is committed."""
    hf_hub.create_repo("org/m", gitattributes=False)
    hf_hub.commit("org/m", {"tokenizer.json": b'{"vocab": "%s"}' % (b"x" * 50_000)}, lfs=())
    hf_hub.always("resolve", Fault(corrupt_at=30_000))
    p = await pipeline(sources=hub_settings(hf_hub))

    model = await p.pull("hf://org/m", ok=False)

    assert model.state == FAILED and model.error is not None
    assert "git blob id mismatch" in model.error and "tokenizer.json" in model.error
    assert p.blob_count() == 0 and not list(p.store.partial.iterdir())


async def test_git_oid_of_a_file_is_recorded_and_malformed_ones_refused(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hf_hub.create_repo("org/m", gitattributes=False)
    data = b'{"model_type": "test"}'
    hf_hub.commit("org/m", {"config.json": data}, lfs=())
    p = await pipeline(sources=hub_settings(hf_hub))
    model = await p.pull("hf://org/m")
    git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    assert model.to_json()["files"][0]["git_oid"] == git_oid

    source = p.sources["hf"]
    with pytest.raises(SourceError, match=r"'w\.bin' has a malformed git oid"):
        source._file("org/m", "0" * 40, {"type": "file", "path": "w.bin", "size": 1,
                                         "oid": "not-hex"})


@pytest.mark.slow
async def test_429_with_retry_after_is_waited_out(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", model_files())
    hf_hub.fault("tree", Fault(status=429, retry_after=1))
    hf_hub.fault("resolve", Fault(status=429, retry_after=1))
    p = await pipeline(sources=hub_settings(hf_hub))

    started = time.monotonic()
    model = await p.pull("hf://org/m")

    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was honoured"
    assert p.tree(model) == hf_hub.files("org/m")
    tree_statuses = [r.status for r in hf_hub.log("tree")]
    assert tree_statuses[0] == 429 and tree_statuses[1] == 200
    assert 429 in [r.status for r in hf_hub.log("resolve")]


async def test_errors_quote_the_hub_and_never_the_token(
    hf_hub_factory: Callable[..., HubServer], pipeline: PipelineFactory
) -> None:
    """The Hub says why in ``X-Error-Message`` (a gated repo says what to do): the error
    quotes it, and a token the server echoes is redacted."""
    hub = hf_hub_factory(tokens={"hf_secret"})
    hub.create_repo("org/m")
    hub.commit("org/m", model_files())
    p = await pipeline(sources=hub_settings(hub))

    missing = await p.pull("hf://org/m@nope", ok=False)
    assert missing.error is not None and "not found (404)" in missing.error
    assert "(the server says: Invalid rev id: nope)" in missing.error

    hub.fault("info", Fault(status=403, headers={
        "X-Error-Message": "Access to model org/m is restricted; token hf_secret is not "
                           "in the authorized list. Visit https://hub/org/m to ask for it."}))
    gated = await p.pull("hf://org/m@main", ok=False, credentials={"token": "hf_secret"})
    assert gated.error is not None and "access denied (403)" in gated.error
    assert "Access to model org/m is restricted; token [redacted] is not" in gated.error
    assert "hf_secret" not in gated.error


@pytest.mark.slow
async def test_429_waits_for_the_ratelimit_window_to_reset(
    hf_hub: HubServer, pipeline: PipelineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Hugging Face answers a 429 with ``RateLimit: "api";r=0;t=N`` (the window resets in N
    s) and no Retry-After. The agent waits that long, on the API and on a resolve alike;
    its own backoff here (50 ms at most) would have spent its attempts inside the window."""
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", model_files())
    hf_hub.fault("tree", Fault(status=429, headers={"RateLimit": '"api";r=0;t=2'}))
    hf_hub.fault("resolve", Fault(status=429, headers={"RateLimit": '"resolvers";r=0;t=1'}))
    p = await pipeline(sources=hub_settings(hf_hub))

    started = time.monotonic()
    model = await p.pull("hf://org/m")

    assert time.monotonic() - started >= 3.0, "both windows were waited out"
    assert p.tree(model) == hf_hub.files("org/m")
    assert [r.status for r in hf_hub.log("tree")][:2] == [429, 200]
    assert 429 in [r.status for r in hf_hub.log("resolve")]
    waits = [r for r in caplog.records if r.levelname == "WARNING"
             and r.getMessage() in ("retrying control request", "retrying segment")]
    assert {r.getMessage() for r in waits} == {"retrying control request", "retrying segment"}
    assert all("rate limited: it asks to wait" in r.error for r in waits)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["../escape.bin"], "'..'"),
        (["/etc/escape.bin"], "absolute"),
        (["nul\x00escape.bin"], "NUL"),
        (["escape.bin", "escape.bin"], "twice"),
        (["escape.bin", "escape.bin/inner"], "both a file and a directory"),
    ],
)
async def test_hostile_names_refused_and_nothing_written(
    hf_hub: HubServer, pipeline: PipelineFactory, tmp_path: Path, names: list[str],
    expected: str,
) -> None:
    hf_hub.create_repo("org/evil")
    hf_hub.hostile_commit("org/evil", [(n, b"pwned") for n in names], lfs=True)
    p = await pipeline(sources=hub_settings(hf_hub))

    model = await p.pull("hf://org/evil", ok=False)

    assert model.state == FAILED and model.error is not None
    assert expected in model.error and "hf://org/evil" in model.error
    assert not hf_hub.log("resolve"), "refused before any byte was asked for"
    assert not files_named(tmp_path, "escape.bin") and not files_named(Path("/etc"), "escape.bin")
    assert p.blob_count() == 0


async def test_moved_branch_is_a_new_tree_after_the_refresh_interval(
    hf_hub: HubServer, pipeline: PipelineFactory
) -> None:
    hf_hub.create_repo("org/m")
    first = hf_hub.commit("org/m", model_files(1))
    p = await pipeline(sources=hub_settings(hf_hub), refresh_interval=0.0)
    model = await p.pull("hf://org/m@main", pin=True)
    assert model.manifest is not None
    old_tree = p.store.models / model.key / model.manifest.tree
    old_files = read_tree(old_tree)
    old_inodes = {f: (old_tree / f).stat().st_ino for f in old_files}

    await p.refresh(model)  # same commit: nothing changes
    assert model.manifest.revision == first and model.manifest.tree == old_tree.name

    second = hf_hub.commit("org/m", {"config.json": b'{"rev": 2}', "extra.md": b"new"})
    hf_hub.reset_log()
    await p.refresh(model)

    assert model.manifest.revision == second and model.manifest.tree != old_tree.name
    assert p.tree(model) == hf_hub.files("org/m", second)
    assert old_tree.name in model.manifest.previous
    assert read_tree(old_tree) == old_files, "the old tree is untouched"
    assert {f: (old_tree / f).stat().st_ino for f in old_files} == old_inodes
    fetched = {r.path.rsplit("/", 1)[-1] for r in hf_hub.log("resolve")}
    assert fetched == {"config.json", "extra.md"}, (
        "unchanged files, LFS shards (by sha256) and files kept in git (by git blob id), "
        "are not fetched again")


async def test_next_page_link_to_another_host_is_refused(faulty: FaultyServer) -> None:
    """A hub (or a mirror) cannot send the token to another host through a Link header."""
    sha = "a" * 40
    faulty.add("/api/models/org/m/revision/main", json.dumps({"sha": sha}).encode())
    faulty.add(f"/api/models/org/m/tree/{sha}", b"[]", extra_headers={
        "Link": '<http://127.0.0.2:9/api/models/org/m/tree/x?cursor=1>; rel="next"'})
    control = Control(Egress(EgressSettings(allow_hosts=LOOPBACK_HOSTS)))
    source = HfSource(control, faulty.base_url)
    try:
        with pytest.raises(SourceError, match="another host"):
            await source.resolve(parse("hf://org/m"), {"token": "hf_secret"})
    finally:
        await source.close()


@pytest.mark.slow
async def test_real_agent_pulls_a_private_repo_through_its_admin_api(
    hf_hub_factory: Callable[..., HubServer], tmp_path: Path
) -> None:
    hub = hf_hub_factory(cdn=True, tokens={"hf_secret"})
    hub.create_repo("org/private", private=True)
    sha = hub.commit("org/private", model_files())
    secrets = tmp_path / "secrets" / "hf-token"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("hf_secret\n")

    with AgentProcess(tmp_path / "store", env={"HF_ENDPOINT": hub.base_url},
                      allow_hosts=LOOPBACK_HOSTS,
                      extra_args=("--credentials-dir", str(secrets.parent))) as agent:
        async with AgentClient(agent.url, agent.token) as client:
            started = await client.ensure("hf://org/private@main", credentials="hf-token")
            model = await client.model(started["key"], wait=60)
            listed = await client.models()

    assert model["state"] == "ready", model["error"]
    assert model["revision"] == sha
    manifest = json.loads((agent.store / "models" / model["key"] / "manifest.json").read_text())
    assert manifest["uri"] == "hf://org/private@main" and manifest["revision"] == sha
    tree = agent.store / "models" / model["key"] / manifest["tree"]
    assert read_tree(tree) == hub.files("org/private")
    assert "hf_secret" not in json.dumps([model, listed, manifest])
    assert all(r.authorization is None for r in hub.log("cdn"))
