"""``modelcache demo``: a self-contained tour on loopback, no cluster and no internet.

It generates a small sharded model in two versions that differ in one shard, serves them
from a Hugging Face-compatible hub on 127.0.0.1, starts a real agent on a temporary store,
pulls version 1, then version 2 (only the changed shard crosses the network), and shows the
store, the dedup savings and the metrics. Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from agent.cli.client import AgentClient
from agent.cli.progress import ProgressBar, human_bytes
from agent.main import build, serve
from agent.settings import AgentSettings, ApiSettings, EgressSettings, SourceSettings, StoreSettings
from agent.store.hashing import git_blob_hasher

REPO = "demo/tiny-llm"
SHARD_BYTES = 24 * 1024 * 1024
SHARDS = 3


def make_model(version: int) -> dict[str, bytes]:
    """A safetensors-like sharded model; version 2 changes only the last shard."""
    files: dict[str, bytes] = {
        "config.json": json.dumps({"architectures": ["TinyLlm"], "hidden_size": 512,
                                   "num_hidden_layers": 4, "vocab_size": 32000}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
    }
    index: dict[str, str] = {}
    for i in range(1, SHARDS + 1):
        name = f"model-{i:05d}-of-{SHARDS:05d}.safetensors"
        seed = f"shard-{i}-v{version if i == SHARDS else 1}".encode()
        tensor = f"layers.{i}.weight"
        header = json.dumps({tensor: {"dtype": "F16", "shape": [SHARD_BYTES // 2],
                                      "data_offsets": [0, SHARD_BYTES]}}).encode()
        files[name] = struct.pack("<Q", len(header)) + header + _noise(seed, SHARD_BYTES)
        index[tensor] = name
    files["model.safetensors.index.json"] = json.dumps({"weight_map": index}).encode()
    return files


def _noise(seed: bytes, n: int) -> bytes:
    """Deterministic incompressible bytes (a stand-in for weights)."""
    out = bytearray()
    block = hashlib.sha512(seed).digest()
    while len(out) < n:
        block = hashlib.sha512(block).digest()
        out += block * 64
    return bytes(out[:n])


class MiniHub:
    """Enough of the Hugging Face hub API for ``hf://`` pulls (revision, tree, resolve)."""

    def __init__(self, revisions: dict[str, dict[str, bytes]]) -> None:
        self.commits = {hashlib.sha1(tag.encode()).hexdigest(): files  # noqa: S324 - an id
                        for tag, files in revisions.items()}
        self.tags = {tag: hashlib.sha1(tag.encode()).hexdigest()  # noqa: S324
                     for tag in revisions}
        self.served: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.revision)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        return app

    def _files(self, rev: str) -> dict[str, bytes]:
        sha = self.tags.get(rev, rev)
        if sha not in self.commits:
            raise web.HTTPNotFound(text="revision not found")
        return self.commits[sha]

    async def revision(self, request: web.Request) -> web.Response:
        rev = request.match_info["rev"]
        self._files(rev)
        return web.json_response({"id": REPO, "sha": self.tags.get(rev, rev)})

    async def tree(self, request: web.Request) -> web.Response:
        files = self._files(request.match_info["rev"])
        entries = []
        for path, data in sorted(files.items()):
            oid = git_blob_hasher(len(data))
            oid.update(data)
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data),
                                     "oid": oid.hexdigest()}
            if path.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
            entries.append(entry)
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        files = self._files(request.match_info["rev"])
        path = unquote(request.match_info["path"])
        if path not in files:
            raise web.HTTPNotFound(text="file not found")
        data = files[path]
        start, end = 0, len(data)
        status = 200
        if request.http_range.start is not None or request.http_range.stop is not None:
            start, end, _ = request.http_range.indices(len(data))
            status = 206
        resp = web.StreamResponse(status=status, headers={
            "Content-Length": str(end - start), "Accept-Ranges": "bytes",
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await resp.prepare(request)
        await resp.write(data[start:end])
        self.served[path] += end - start
        return resp


async def run_demo(keep: bool = False, out: Callable[[str], None] | None = None) -> int:
    say = out or (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="modelcache-demo-") as tmp:
        root = Path(tmp)
        hub = MiniHub({"v1": make_model(1), "v2": make_model(2)})
        hub_runner = web.AppRunner(hub.app(), access_log=None)
        await hub_runner.setup()
        hub_site = web.TCPSite(hub_runner, "127.0.0.1", 0)
        await hub_site.start()
        hub_url = _url(hub_runner)
        say(f"1. A Hugging Face-compatible hub serves {REPO} at {hub_url}: two versions "
            f"of {SHARDS} shards of {human_bytes(SHARD_BYTES)}; v2 changes only the last "
            "shard.")

        settings = AgentSettings(
            node_name="demo-node",
            store=StoreSettings(path=root / "store"),
            egress=EgressSettings(allow_hosts=("127.0.0.1",)),
            sources=SourceSettings(hf_endpoint=hub_url),
            api=ApiSettings(listen="127.0.0.1:0", token_file=root / "token"),
        )
        deps = await build(settings)
        stop, started = asyncio.Event(), asyncio.Event()
        agent_task = asyncio.create_task(serve(deps, stop, started))
        await started.wait()
        agent_url = f"http://{deps.state.address}"
        say(f"2. An agent runs on {agent_url} with its store in {settings.store.path}.")
        token = (root / "token").read_text().strip()
        try:
            async with AgentClient(agent_url, token) as client:
                for step, version in ((3, "v1"), (4, "v2")):
                    before = Counter(hub.served)
                    uri = f"hf://{REPO}@{version}"
                    model = await _pull(client, uri)
                    fetched = {p: n - before[p] for p, n in hub.served.items() if n > before[p]}
                    shards = sorted(p for p in fetched if p.endswith(".safetensors"))
                    say(f"{step}. Pulled {uri} -> {model['state']}, {len(model['files'])} files, "
                        f"{human_bytes(model['size_bytes'])}, revision "
                        f"{model['revision'][:12]}.")
                    say(f"   Crossed the network: {human_bytes(sum(fetched.values()))}; shards "
                        f"downloaded: {', '.join(shards) or 'none'}.")
                    if model["state"] != "ready":
                        say(f"   error: {model['error']}")
                        return 1
                store = await client.store()
                say(f"5. The store holds {store['blobs']} distinct blobs, "
                    f"{human_bytes(store['cache_bytes'])}; dedup saves "
                    f"{human_bytes(store['dedup_saved_bytes'])} (the shards v1 and v2 share).")
                models = await client.models()
                for m in models:
                    manifest = deps.store.manifest(m["key"])
                    where = deps.store.tree_path(manifest) if manifest else "(not published)"
                    say(f"   {m['key']}  {m['state']}  {m['uri']}  ->  {where}")
                metrics = await client.metrics()
                say("6. Metrics (excerpt of /metrics):")
                for line in metrics.splitlines():
                    if line.startswith(("modelcache_pulled_bytes_total",
                                        "modelcache_cache_requests_total",
                                        "modelcache_dedup_hits_total",
                                        "modelcache_store_bytes{kind=\"dedup_saved\"}",
                                        "modelcache_models{")):
                        say(f"   {line}")
                again = await client.ensure(f"hf://{REPO}@v1")
                say(f"7. Asking for hf://{REPO}@v1 again is a cache hit: {again['state']} at once.")
        finally:
            stop.set()
            await agent_task
            await hub_runner.cleanup()
        if keep:
            kept = Path(tempfile.mkdtemp(prefix="modelcache-demo-kept-"))
            os.rename(root / "store", kept / "store")
            say(f"8. Store kept in {kept / 'store'}.")
        else:
            say("8. Stopped the agent and the hub, removed the temporary store. Done.")
    return 0


async def _pull(client: AgentClient, uri: str) -> dict[str, Any]:
    """Pull and follow; a progress bar on a terminal, nothing extra when piped."""
    model = await client.ensure(uri)
    bar = ProgressBar(uri, stream=sys.stderr) if sys.stderr.isatty() else None

    def show(m: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(m["bytes_done"], m["size_bytes"], m["state"])

    model = await client.follow(model["key"], show, interval=0.2)
    if bar is not None:
        bar.close()
    return model


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


__all__ = ["MiniHub", "make_model", "run_demo"]
