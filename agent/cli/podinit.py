"""``modelcache init``: the init container the webhook injects into a pod.

The pod has two mounts (docs/webhook.md): the model's store directory ``models/<key>``
read-only at ``--side-path`` (cache mode only), and an emptyDir at ``--mount-path``. This
program fills the emptyDir, and the pod's containers start only after it succeeds, so they
never see an empty or partial model:

1. cache mode: ask the node's agent to ensure the model (a hit when warm, a pull when cold,
   followed until ready), then link every file of the published tree into the mount path
   (symlinks into the side path: zero copy). If the agent is down, refuses or fails and
   the tree is not already on the node:
2. fallback ``source``: pull from the source with the agent's own fetch engine into the
   emptyDir (resumable after a restart of this container), verified the same way, then move
   the files into place; fallback ``none``: fail with a clear message.
3. download mode: no side path at all; the agent is asked (without waiting) to warm the
   node, and the files come from the source as in 2.

With a signature policy (``--verify``, the pod's ``modelcache.io/verify``) the model is linked
only if the manifest the side mount shows carries a passing check under that policy (the
pod's namespace and the policy name: ``agent.verify.require_verified``), and there is no
fallback: a download from the source could not be checked here, so it is never used.

The fallback runs as the pod itself, with the pod's own network identity and the pod's
credentials Secret: it is not the node agent's egress allowlist that guards it, the pod's
network policy is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent import logs
from agent.cli.client import AgentClient, AgentError
from agent.egress import Egress
from agent.fetch.engine import Fetcher
from agent.index import Index
from agent.pull.credentials import read_secret_dir
from agent.pull.puller import Puller
from agent.settings import AgentSettings, EgressSettings, SourceSettings, StoreSettings
from agent.store.local import Store
from agent.store.names import join_inside
from agent.store.recovery import recover
from agent.store.trees import MANIFEST, Manifest
from agent.verify import require_verified
from common.errors import ModelcacheError, NoSpace
from common.reference import Reference, parse, policy_scope

log = logging.getLogger("modelcache.init")
#: a PEM bundle of CAs the download trusts, set by the webhook (``--init-ca-file``)
CA_ENV = "MODELCACHE_CA_PEM"
#: the pod's namespace (downward API): a policy is the ConfigMap of that name there
NAMESPACE_ENV = "MODELCACHE_NAMESPACE"
WORK_DIR = ".modelcache"
#: give up on an agent pull that makes no progress for this long, and fall back
STALL_SECONDS = 300.0


class InitError(ModelcacheError):
    reason = "init"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelcache init",
                                description="Put a model at the mount path (injected init "
                                            "container).")
    p.add_argument("--uri", required=True)
    p.add_argument("--include", default="", help="comma-separated globs")
    p.add_argument("--mount-path", required=True, type=Path)
    p.add_argument("--side-path", type=Path, default=Path("/var/run/modelcache/model"))
    p.add_argument("--agent-url", default="http://modelcache-agent.modelcache.svc:9400")
    p.add_argument("--token-file", type=Path,
                   default=Path("/var/run/secrets/modelcache/token"))
    p.add_argument("--fallback", choices=("source", "none"), default="source")
    p.add_argument("--mode", choices=("cache", "download"), default="cache")
    p.add_argument("--credentials", help="name of the pod's credentials Secret (the agent "
                   "reads it in the pod's namespace)")
    p.add_argument("--credentials-dir", type=Path, help="the same Secret, mounted (fallback)")
    p.add_argument("--verify", metavar="POLICY",
                   help="serve the model only if it passed this signature policy (a ConfigMap "
                   "in the pod's namespace); no fallback download")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to reach the agent before falling back")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level)
    started = time.monotonic()
    try:
        how = asyncio.run(run(args))
    except ModelcacheError as e:
        log.error("the model could not be provided", extra={"uri": args.uri, "error": str(e)})
        print(f"modelcache init: {e}", file=sys.stderr)
        return 1
    log.info("model in place", extra={"uri": args.uri, "how": how,
                                      "seconds": round(time.monotonic() - started, 3)})
    return 0


async def run(args: argparse.Namespace) -> str:
    """Fill the mount path; return how (``warm``, ``agent``, ``source``)."""
    scope = policy_scope(os.environ.get(NAMESPACE_ENV) or None, args.verify) \
        if args.verify else ""
    ref = parse(args.uri, args.include or None, scope)
    if not ref.cached:
        raise InitError(f"{ref.scheme}:// models are mounted directly; no init container needed")
    token = await asyncio.to_thread(prepare, args)
    agent_error: str | None = None
    if args.mode == "cache":
        try:
            how = await via_agent(ref, args, token)
            if not await asyncio.to_thread(link_side, args, ref.key, ref.verify):
                raise InitError("the agent reports the model ready but the side mount "
                                f"{args.side_path} shows no manifest")
            return how
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
    """Tell the agent (if it answers) that this pod fell back, for its metrics."""
    try:
        async with AgentClient(args.agent_url, token, timeout=args.connect_timeout) as client:
            await client.report_fallback(ref.key)
    except AgentError as e:
        log.info("could not report the fallback to the agent", extra={"error": str(e)})


async def via_agent(ref: Reference, args: argparse.Namespace, token: str | None) -> str:
    """Ensure the model through the node's agent; return ``warm`` or ``agent``."""
    async with AgentClient(args.agent_url, token, timeout=args.connect_timeout) as client:
        model = await client.ensure(ref.uri, list(ref.include) or None,
                                    credentials=args.credentials, verify=args.verify)
        if model["key"] != ref.key:
            raise InitError(f"the agent names the model {model['key']}, this pod expects "
                            f"{ref.key}: not the same reference and policy")
        if model["state"] == "ready":
            return "warm"
        last_done, last_change = -1, time.monotonic()

        def show(m: dict[str, Any]) -> None:
            nonlocal last_done, last_change
            if m["bytes_done"] != last_done:
                last_done, last_change = m["bytes_done"], time.monotonic()
                log.info("agent pulling", extra={"bytes_done": m["bytes_done"],
                                                 "size_bytes": m["size_bytes"]})
            if time.monotonic() - last_change > STALL_SECONDS:
                raise InitError(f"the agent's pull made no progress for {STALL_SECONDS:.0f} s")

        model = await client.follow(model["key"], show, interval=2.0)
        if model["state"] != "ready":
            raise InitError(f"the agent's pull failed: {model.get('error')}")
        return "agent"


async def warm_node(ref: Reference, args: argparse.Namespace, token: str | None) -> None:
    """Download mode: ask the agent to warm the node for the next pod; do not wait."""
    try:
        async with AgentClient(args.agent_url, token, timeout=args.connect_timeout) as client:
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
    await asyncio.to_thread(place, store.models / ref.key / manifest.tree, manifest, mount)
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


def prepare(args: argparse.Namespace) -> str | None:
    """Create and empty the mount path (a restarted init container starts clean, keeping
    its work directory to resume); return the agent token."""
    args.mount_path.mkdir(parents=True, exist_ok=True)
    clear(args.mount_path)
    return _read_token(args.token_file)


def link_side(args: argparse.Namespace, key: str, policy: str = "") -> bool:
    """Link the tree the side mount shows; False if it shows none. With a policy, a tree
    without a passing check under it is refused (:class:`VerificationFailed`)."""
    manifest = read_side_manifest(args.side_path, key)
    if manifest is None:
        return False
    require_verified(manifest, policy)
    link_tree(manifest, args.side_path, args.mount_path)
    shutil.rmtree(args.mount_path / WORK_DIR, ignore_errors=True)
    return True


def place(tree: Path, manifest: Manifest, mount: Path) -> None:
    """Hard-link the downloaded tree's files into the mount path (the same emptyDir),
    then remove the work directory."""
    for f in manifest.files:
        dst = join_inside(mount, f.path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(join_inside(tree, f.path), dst)
    shutil.rmtree(mount / WORK_DIR, ignore_errors=True)


def read_side_manifest(side: Path, key: str) -> Manifest | None:
    """The manifest the agent published in the side mount, if its tree is there."""
    try:
        data = json.loads((side / MANIFEST).read_text())
        manifest = Manifest.from_json(data)
    except (OSError, ValueError, KeyError, ModelcacheError):
        return None
    if manifest.key != key or not (side / manifest.tree).is_dir():
        return None
    return manifest


def link_tree(manifest: Manifest, side: Path, mount: Path) -> None:
    """Symlink every file of the tree into the mount path (absolute links: the app
    containers mount the side path at the same place)."""
    tree = side / manifest.tree
    for f in manifest.files:
        target = join_inside(tree, f.path)
        if not target.is_file():
            raise InitError(f"published tree {manifest.tree} is missing {f.path}")
        link = join_inside(mount, f.path)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)


def clear(mount: Path) -> None:
    """Empty the mount path (an emptyDir that only we write), keeping the work directory
    so that a fallback download resumes."""
    for entry in os.scandir(mount):
        if entry.name == WORK_DIR:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _read_token(path: Path | None) -> str | None:
    try:
        return path.read_text().strip() if path else None
    except OSError:
        return None


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
