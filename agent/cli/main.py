"""``modelcache``: one command line for the agent, the webhook, the init container, the admin
client and the demo.

Each command imports what it needs when it runs: ``modelcache init`` on a warm node (the pod
waits for it) must not pay for the admin client's aiohttp and asyncio."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from common.errors import ModelcacheError, StoreError

if TYPE_CHECKING:
    from agent.cli.client import AgentClient

DEFAULT_TOKEN_FILE = Path("/var/lib/modelcache/admin-token")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "webhook":
        from webhook.main import main as webhook_main

        return webhook_main(argv[1:])
    if argv and argv[0] == "init":
        from agent.cli.podinit import main as init_main

        return init_main(argv[1:])
    from agent.cli.client import AgentError

    args = parser().parse_args(argv)
    if not getattr(args, "func", None):
        parser().print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if e.status else 3
    except ModelcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelcache",
        description="A node-level model cache for Kubernetes.",
    )
    p.add_argument("--version", action="version", version=f"modelcache {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    from agent.cli.client import DEFAULT_AGENT
    from agent.config import add_agent_flags

    a = sub.add_parser("agent", help="run the node agent")
    add_agent_flags(a)
    a.set_defaults(func=cmd_agent)
    o = sub.add_parser("prepare-store", help="hand the store to the agent's user (the "
                       "DaemonSet's store-owner step: root with CAP_CHOWN alone)")
    o.add_argument("--store", default="/var/lib/modelcache", help="the store's root")
    o.add_argument("--owner", default="65532:65532", metavar="UID:GID",
                   help="the agent's user and group")
    o.set_defaults(func=cmd_prepare_store)
    sub.add_parser("webhook", help="run the admission webhook (see 'modelcache webhook -h')")
    sub.add_parser("init", help="the injected init container (see 'modelcache init -h')")

    def client_flags(c: argparse.ArgumentParser) -> None:
        c.add_argument("--agent", default=os.environ.get("MODELCACHE_AGENT", DEFAULT_AGENT),
                       help=f"agent URL (default {DEFAULT_AGENT})")
        c.add_argument("--token-file", help="bearer token for writes "
                       f"(default $MODELCACHE_TOKEN or {DEFAULT_TOKEN_FILE})")
        c.add_argument("--json", action="store_true", help="print JSON for scripts")

    c = sub.add_parser("pull", help="ask the agent to pull a model")
    c.add_argument("uri")
    c.add_argument("--include", action="append", metavar="GLOB", help="select files (repeatable)")
    c.add_argument("--pin", action="store_true", help="never evict it")
    c.add_argument("--credentials", help="name of the credentials (a Secret) to use")
    c.add_argument("--verify", metavar="POLICY",
                   help="publish it only if its signature passes this policy")
    c.add_argument("--wait", action="store_true", help="follow the pull until it ends")
    client_flags(c)
    c.set_defaults(func=cmd_pull)

    c = sub.add_parser("ls", help="list the models on the agent")
    client_flags(c)
    c.set_defaults(func=cmd_ls)

    c = sub.add_parser("rm", help="evict a model")
    c.add_argument("key")
    c.add_argument("--force", action="store_true", help="even while in use")
    client_flags(c)
    c.set_defaults(func=cmd_rm)

    c = sub.add_parser("gc", help="free space: unused trees and unreferenced blobs")
    client_flags(c)
    c.set_defaults(func=cmd_gc)

    c = sub.add_parser("status", help="the agent's store and models")
    client_flags(c)
    c.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", help="a self-contained tour on loopback (no cluster, no internet)")
    d.add_argument("--keep", action="store_true", help="keep the temporary store afterwards")
    d.set_defaults(func=cmd_demo)
    return p


# --- commands -------------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from agent.config import agent_settings
    from agent.main import run
    from common import logs

    logs.setup(args.log_level)
    settings = agent_settings(args)
    asyncio.run(run(settings, Path(args.credentials_dir) if args.credentials_dir else None))
    return 0


def cmd_prepare_store(args: argparse.Namespace) -> int:
    from agent.store.owner import hand_over, parse_owner

    uid, gid = parse_owner(args.owner)
    try:
        changed = hand_over(Path(args.store), uid, gid)
    except OSError as e:
        raise StoreError(f"cannot hand {args.store} to {args.owner}: {e}") from e
    for path in changed:
        print(f"handed {path} to {uid}:{gid}")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if os.environ.get("MODELCACHE_TOKEN"):
        return os.environ["MODELCACHE_TOKEN"].strip()
    if os.access(DEFAULT_TOKEN_FILE, os.R_OK):
        return DEFAULT_TOKEN_FILE.read_text().strip()
    return None


def _client(args: argparse.Namespace) -> AgentClient:
    from agent.cli.client import AgentClient

    return AgentClient(args.agent, _token(args))


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_pull(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli.progress import ProgressBar, human_bytes

    async def go() -> dict[str, Any]:
        async with _client(args) as client:
            model = await client.ensure(args.uri, args.include, args.pin, args.credentials,
                                        args.verify)
            if not args.wait or model["state"] != "pulling":
                return model
            bar = ProgressBar(model["key"] if args.json else args.uri,
                              stream=sys.stderr)

            def show(m: dict[str, Any]) -> None:
                bar.update(m["bytes_done"], m["size_bytes"], m["state"])

            model = await client.follow(model["key"], show)
            bar.close()
            return model

    model = asyncio.run(go())
    text = f"{model['key']}  {model['state']}  {human_bytes(model['size_bytes'])}  {model['uri']}"
    if model.get("verified"):
        text += "\n" + _verified(model["verified"])
    if model.get("error"):
        text += f"\nerror: {model['error']}"
    _print(args, model, text)
    return 1 if model["state"] == "failed" else 0


def cmd_ls(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli.progress import human_bytes

    async def go() -> list[dict[str, Any]]:
        async with _client(args) as client:
            return await client.models()

    models = asyncio.run(go())
    rows = [f"{'KEY':24}  {'STATE':7}  {'SIZE':>10}  {'PIN':3}  {'USE':3}  {'VERIFIED':12}  URI"]
    for m in models:
        verified = (m.get("verified") or {}).get("policy") or "-"
        rows.append(f"{m['key']:24}  {m['state']:7}  {human_bytes(m['size_bytes']):>10}  "
                    f"{'yes' if m['pinned'] else '-':3}  {'yes' if m['in_use'] else '-':3}  "
                    f"{verified:12}  {m['uri']}")
    _print(args, {"models": models}, "\n".join(rows))
    return 0


def _verified(check: dict[str, Any]) -> str:
    return (f"verified: policy {check['policy']} ({check['method']}), signed by "
            f"{check['signer']}, checked {check['time']}")


def cmd_rm(args: argparse.Namespace) -> int:
    import asyncio

    async def go() -> dict[str, Any]:
        async with _client(args) as client:
            return await client.remove(args.key, args.force)

    model = asyncio.run(go())
    _print(args, model, f"evicted {model['key']} ({model['uri']})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli.progress import human_bytes

    async def go() -> dict[str, Any]:
        async with _client(args) as client:
            return await client.gc()

    result = asyncio.run(go())
    _print(args, result, f"freed {human_bytes(result['freed_bytes'])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli.progress import human_bytes

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with _client(args) as client:
            return await client.store(), await client.models()

    store, models = asyncio.run(go())
    states: dict[str, int] = {}
    for m in models:
        states[m["state"]] = states.get(m["state"], 0) + 1
    used = store["used_bytes"] / store["capacity_bytes"] if store["capacity_bytes"] else 0.0
    text = "\n".join([
        f"store       {store['path']}",
        f"disk        {human_bytes(store['used_bytes'])} of {human_bytes(store['capacity_bytes'])}"
        f" used ({used:.0%}; evicts at {store['high_watermark']:.0%} down to "
        f"{store['low_watermark']:.0%})",
        f"cache       {human_bytes(store['cache_bytes'])} in {store['blobs']} blobs, "
        f"{human_bytes(store['dedup_saved_bytes'])} saved by dedup",
        "models      " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"),
    ])
    _print(args, {"store": store, "models": models}, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli.demo import run_demo

    return asyncio.run(run_demo(keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
