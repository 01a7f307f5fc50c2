"""The init container's paths that wait or download (``modelcache init``, after
``agent/cli/podinit.py`` found no warm tree): follow the agent's pull, fall back to the
source, or download (download mode). Imported only then: a warm node needs none of this.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.cli.client import AgentClient, AgentError
from agent.cli.podinit import WORK_DIR, Asked, InitError, Refused, link_side, log, model_problem
from agent.egress import Egress
from agent.fetch.engine import Fetcher
from agent.index import Index
from agent.pull.credentials import read_secret_dir
from agent.pull.puller import Puller
from agent.settings import AgentSettings, EgressSettings, SourceSettings, StoreSettings
from agent.store.local import Store
from agent.store.names import join_inside
from agent.store.recovery import recover
from agent.store.roles import Provider
from agent.store.trees import Manifest
from common.errors import ModelcacheError, NoSpace
from common.reference import Reference

#: a PEM bundle of CAs the download trusts, set by the webhook (``--init-ca-file``)
CA_ENV = "MODELCACHE_CA_PEM"
#: give up on an agent pull that makes no progress for this long, and fall back
STALL_SECONDS = 300.0


async def run(args: argparse.Namespace, ref: Reference, token: str | None,
              asked: Asked | None) -> str:
    """Everything but a warm node: follow the agent's pull, or fall back to the source
    (cache mode; ``asked`` is the agent's answer), or download (download mode)."""
    if args.mode == "cache":
        assert asked is not None
        try:
            how = await follow_agent(args, token, asked)
            if not await asyncio.to_thread(link_side, args, ref.key, ref.verify):
                raise InitError("the agent reports the model ready but the side mount "
                                f"{args.side_path} shows no usable tree")
            return how
        except Refused:
            raise  # the agent will not serve this pod: nothing is linked, nothing fetched
        except ModelcacheError as e:
            agent_error = str(e)
            if await asyncio.to_thread(link_side, args, ref.key, ref.verify):
                # warm on this node even though the agent is not answering
                log.warning("agent not usable, but the model is on the node",
                            extra={"error": agent_error})
                return "warm"
        if ref.verify:
            raise InitError(f"verify policy {args.verify!r}: the node's agent cannot provide "
                            f"a verified {ref.display} ({agent_error}); a download from the "
                            "source cannot be verified here and is not used")
        if args.fallback == "none":
            raise InitError(f"the node's agent cannot provide {ref.display} ({agent_error}) "
                            "and modelcache.io/fallback is none")
        log.warning("falling back to the source", extra={"error": agent_error})
    elif ref.verify:
        raise InitError(f"verify policy {args.verify!r}: mode download fetches from the "
                        "source, which cannot be verified here; use mode cache or csi")
    else:
        await warm_node(ref, args, token)
    await from_source(ref, args)
    if args.mode == "cache":
        await report_fallback(ref, args, token)
    return "source"


async def report_fallback(ref: Reference, args: argparse.Namespace, token: str | None) -> None:
    """Tell the agent (if it answers) that this pod fell back, for its metrics (best effort:
    an agent that does not answer at once is not waited for)."""
    try:
        async with AgentClient(args.agent_url, token, timeout=args.connect_timeout,
                               reply_timeout=min(args.reply_timeout, 2.0)) as client:
            await client.report_fallback(ref.key)
    except AgentError as e:
        log.info("could not report the fallback to the agent", extra={"error": str(e)})


async def follow_agent(args: argparse.Namespace, token: str | None, asked: Asked) -> str:
    """Follow the pull the ensure started until the model is ready; ``warm`` if it was
    ready already, ``agent`` once the agent pulled it."""
    if asked.model is None:
        raise InitError(asked.error or "the agent did not answer")
    if asked.ready:
        return "warm"
    last_done, last_change = -1, time.monotonic()
    key = asked.model["key"]

    def show(m: dict[str, Any]) -> None:
        nonlocal last_done, last_change
        problem = model_problem(m)
        if problem is not None or m.get("key") != key:
            raise InitError(f"the agent's reply is not model {key}: {problem or 'another key'}")
        if m["bytes_done"] != last_done:
            last_done, last_change = m["bytes_done"], time.monotonic()
            log.info("agent pulling", extra={"bytes_done": m["bytes_done"],
                                             "size_bytes": m["size_bytes"]})
        if time.monotonic() - last_change > STALL_SECONDS:
            raise InitError(f"the agent's pull made no progress for {STALL_SECONDS:.0f} s")

    try:
        async with AgentClient(args.agent_url, token, timeout=args.connect_timeout,
                               reply_timeout=args.reply_timeout) as client:
            model = await client.follow(key, show, interval=2.0)
    except AgentError as e:
        if e.status in (401, 403):
            raise Refused(f"the node's agent refuses this pod: HTTP {e.status}: {e}") from e
        raise
    if model["state"] != "ready":
        raise InitError(f"the agent's pull failed: {model.get('error')}")
    return "agent"


async def warm_node(ref: Reference, args: argparse.Namespace, token: str | None) -> None:
    """Download mode: ask the agent to warm the node for the next pod; do not wait."""
    try:
        async with AgentClient(args.agent_url, token, timeout=args.connect_timeout,
                               reply_timeout=args.reply_timeout) as client:
            await client.ensure(ref.uri, list(ref.include) or None,
                                credentials=args.credentials)
    except AgentError as e:
        log.info("could not ask the agent to warm the node", extra={"error": str(e)})


async def from_source(ref: Reference, args: argparse.Namespace) -> None:
    """Pull with the fetch engine into ``<mount>/.modelcache``, then move the files into
    place (hard links within the emptyDir), then remove the work directory."""
    mount: Path = args.mount_path
    work = mount / WORK_DIR
    credentials = await asyncio.to_thread(read_secret_dir, args.credentials_dir) \
        if args.credentials_dir else None
    # the pod's own identity: every host it can reach is allowed (see the module docstring)
    ca_file = await asyncio.to_thread(_ca_file)
    try:
        egress = Egress(EgressSettings(allow_hosts=("0.0.0.0/0", "::/0"),
                                       allow_schemes=("hf", "s3", "oci", "http", "https",
                                                      "model-registry"),
                                       ca_file=ca_file))
    except ssl.SSLError as e:
        raise InitError(f"the CA bundle the webhook passed (--init-ca-file) is not valid: "
                        f"{e}") from e
    finally:  # loaded into the TLS context by now
        if ca_file is not None:
            ca_file.unlink(missing_ok=True)
    settings = AgentSettings(
        node_name=os.environ.get("MODELCACHE_NODE_NAME", ""),
        store=StoreSettings(path=work), egress=egress.settings,
        sources=SourceSettings.from_config({}, os.environ))
    store = Store(work)
    await asyncio.to_thread(recover, store)  # resume what a previous attempt left
    from agent.sources.catalog import build_sources

    fetcher = Fetcher(store, egress, settings.fetch, settings.archive)
    sources = build_sources(egress, settings)
    puller = Puller(store=store, fetcher=fetcher, sources=sources, index=Index(),
                    egress=egress, settings=settings, reserver=_EmptyDirSpace())
    try:
        model = await puller.ensure(ref, credentials=credentials, count=False)
        if model.task is not None:
            await model.task
        if model.state != "ready" or model.manifest is None:
            raise InitError(f"download from the source failed: {model.error}")
        manifest = model.manifest
    finally:
        await fetcher.close()
        for source in {id(s): s for s in sources.values()}.values():
            await source.close()
    await asyncio.to_thread(place, store, manifest, mount)
    log.info("downloaded from the source", extra={"files": len(manifest.files),
                                                  "bytes": manifest.size_bytes})


class _EmptyDirSpace:
    """The fallback writes into the pod's own emptyDir: its size limit, set by the webhook
    from the model's size, is the only budget; nothing there can be evicted."""

    @contextlib.asynccontextmanager
    async def reserve(self, key: str, nbytes: int) -> AsyncIterator[None]:
        yield

    async def relieve(self, key: str, error: NoSpace) -> None:
        raise error


def place(store: Provider, manifest: Manifest, mount: Path) -> None:
    """Hard-link the downloaded tree's files into the mount path (the same emptyDir),
    then remove the work directory."""
    tree = store.tree_path(manifest)
    for f in manifest.files:
        dst = join_inside(mount, f.path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(join_inside(tree, f.path), dst)
    shutil.rmtree(mount / WORK_DIR, ignore_errors=True)


def _ca_file() -> Path | None:
    """The CA bundle the webhook passed (``--init-ca-file``, in :data:`CA_ENV`), written to
    a temporary file (the init container's /tmp is an emptyDir) for the download to load;
    None without one."""
    pem = os.environ.get(CA_ENV, "")
    if not pem.strip():
        return None
    fd, name = tempfile.mkstemp(prefix="modelcache-ca-", suffix=".pem")
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    return Path(name)
