"""``modelcache init`` against agents and side mounts that are not what they should be: an
agent that refuses the pod (final: nothing linked, nothing downloaded), one that answers
something that is not a model, one that accepts and never answers, and a tree on the side
mount that does not match its manifest (a truncated file, a link, a missing file). Each
but the refusal falls back to the source, whole; none crashes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from common.reference import parse
from tests.agent.test_podinit import mounted, run_init
from tests.servers.agent import AgentProcess
from tests.servers.aioserver import AppThread
from tests.servers.faulty import FaultyServer

MiB = 1024 * 1024


@pytest.fixture
def source(faulty: FaultyServer) -> tuple[FaultyServer, bytes, str]:
    data = os.urandom(MiB)
    faulty.add("/model.safetensors", data)
    return faulty, data, faulty.url("/model.safetensors")


@pytest.fixture
def warm(tmp_path: Path, source: tuple[FaultyServer, bytes, str]) -> Iterator[AgentProcess]:
    """A standalone agent with the model warm."""
    _, _, uri = source
    agent = AgentProcess(tmp_path / "store", log_dir=tmp_path).start()
    try:
        key = agent.ensure(uri)["key"]
        assert agent.wait_ready(key)["state"] == "ready"
        yield agent
    finally:
        agent.stop()


def side_copy(agent: AgentProcess, uri: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the model's directory (to damage), and the file of its tree."""
    key = parse(uri).key
    side = tmp_path / "side"
    shutil.copytree(agent.store / "models" / key, side, symlinks=True)
    manifest = json.loads((side / "manifest.json").read_text())
    return side, side / manifest["tree"] / "model.safetensors"


@pytest.mark.slow
def test_an_agent_that_refuses_the_pod_is_final(
        tmp_path: Path, source: tuple[FaultyServer, bytes, str], warm: AgentProcess) -> None:
    """401 from the agent (a token it does not accept): the tree is on the node and the source
    is reachable, yet nothing is linked and nothing downloaded."""
    server, _, uri = source
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("not-the-agents-token")
    served = server.bytes_sent()
    mount = tmp_path / "mnt"
    code, err, _ = run_init(uri, mount, warm.store / "models" / parse(uri).key, warm.url,
                            bad_token)
    assert code == 1, err
    assert "refuses this pod" in err and "HTTP 401" in err
    assert [p for p in mount.iterdir() if p.name != ".modelcache"] == []
    assert server.bytes_sent() == served, "no download either"


class Replying:
    """An agent that answers every ensure with ``status`` and ``body`` (fault injection)."""

    def __init__(self, status: int, body: object) -> None:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_post("/api/v1/models", answer)
        app.router.add_get("/api/v1/models/{key}", answer)
        self.thread = AppThread(app)

    def __enter__(self) -> str:
        return self.thread.start().url

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()


def test_403_is_final_too(tmp_path: Path, source: tuple[FaultyServer, bytes, str]) -> None:
    server, _, uri = source
    side = tmp_path / "side"
    side.mkdir()
    mount = tmp_path / "mnt"
    with Replying(403, {"error": "pod team-b/web-0 may not ask for this model"}) as url:
        code, err, _ = run_init(uri, mount, side, url, tmp_path / "no-token")
    assert code == 1
    assert "HTTP 403" in err and "may not ask for this model" in err
    assert list(mount.iterdir()) == []
    assert server.bytes_sent() == 0


KEY = "{key}"  # replaced by the model's key: a reply about this very model, misshapen


@pytest.mark.parametrize("body", [
    [], "null", {"key": KEY}, {"key": KEY, "state": "ready!"},
    {"key": KEY, "state": "pulling"}, {"key": KEY, "state": "pulling", "bytes_done": "many"},
    {"key": KEY, "state": "failed", "error": {"why": 1}},
], ids=["list", "string", "no-state", "bad-state", "no-bytes", "bad-bytes", "bad-error"])
def test_a_reply_that_is_not_a_model_means_the_agent_is_unusable(
        tmp_path: Path, source: tuple[FaultyServer, bytes, str], body: object) -> None:
    _, data, uri = source
    if isinstance(body, dict):
        body = {k: parse(uri).key if v == KEY else v for k, v in body.items()}
    side = tmp_path / "side"
    side.mkdir()
    mount = tmp_path / "mnt"
    with Replying(200, body) as url:
        code, err, _ = run_init(uri, mount, side, url, tmp_path / "no-token")
    assert code == 0, err
    assert "Traceback" not in err
    assert mounted(mount) == {"model.safetensors": data}
    assert not (mount / "model.safetensors").is_symlink(), "from the source"


def test_a_pull_followed_into_nonsense_falls_back(
        tmp_path: Path, source: tuple[FaultyServer, bytes, str]) -> None:
    """The ensure answers a pulling model, the follow-up a model of no shape."""
    _, data, uri = source
    key = parse(uri).key
    replies = iter([{"key": key, "state": "pulling", "bytes_done": 0, "size_bytes": 9}])

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(next(replies, {"key": key}))

    app = web.Application()
    app.router.add_post("/api/v1/models", answer)
    app.router.add_get("/api/v1/models/{key}", answer)
    side = tmp_path / "side"
    side.mkdir()
    thread = AppThread(app).start()
    try:
        code, err, _ = run_init(uri, tmp_path / "mnt", side, thread.url, tmp_path / "no-token")
    finally:
        thread.stop()
    assert code == 0, err
    assert "Traceback" not in err and "not model" in err
    assert mounted(tmp_path / "mnt") == {"model.safetensors": data}


@pytest.mark.slow
def test_an_agent_that_never_answers_costs_seconds_not_minutes(
        tmp_path: Path, source: tuple[FaultyServer, bytes, str]) -> None:
    _, data, uri = source
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts, reads nothing, answers nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, name="silent-agent", daemon=True)
    thread.start()
    side = tmp_path / "side"
    side.mkdir()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        code, err, _ = run_init(uri, tmp_path / "mnt", side, url, tmp_path / "no-token")
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        listener.close()
    assert code == 0, err
    assert accepted, "the agent was reached"
    assert took < 20, f"a silent agent held the pod {took:.1f} s"
    assert mounted(tmp_path / "mnt") == {"model.safetensors": data}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "symlink", "missing", "directory"])
def test_a_tree_unlike_its_manifest_is_not_linked(
        tmp_path: Path, source: tuple[FaultyServer, bytes, str], warm: AgentProcess,
        damage: str) -> None:
    """The agent says ready, but the side mount's file is not the manifest's: nothing of it is
    linked, and the source provides the model instead."""
    _, data, uri = source
    side, victim = side_copy(warm, uri, tmp_path)
    os.chmod(victim.parent, 0o755)  # noqa: S103 - the copy is the test's to damage
    secret = tmp_path / "elsewhere"
    secret.write_bytes(data)
    victim.unlink()
    if damage == "truncated":
        victim.write_bytes(data[:1000])
    elif damage == "symlink":
        victim.symlink_to(secret)  # the right bytes, but a link out of the tree
    elif damage == "directory":
        victim.mkdir()
    mount = tmp_path / "mnt"
    code, err, _ = run_init(uri, mount, side, warm.url, warm.store / "admin-token")
    assert code == 0, err
    assert "Traceback" not in err and "not usable" in err
    assert mounted(mount) == {"model.safetensors": data}
    assert not (mount / "model.safetensors").is_symlink(), "downloaded, not linked"
