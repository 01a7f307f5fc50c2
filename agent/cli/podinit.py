"""``modelcache init``: the init container the webhook injects into a pod.

The pod has two mounts (docs/webhook.md): the model's store directory ``models/<key>``
read-only at ``--side-path`` (cache mode only), and an emptyDir at ``--mount-path``. This
program fills the emptyDir, and the pod's containers start only after it succeeds, so they
never see an empty or partial model:

1. cache mode: ask the node's agent to ensure the model (a hit when warm, a pull when cold,
   followed until ready), then link every file of the published tree into the mount path
   (symlinks into the side path: zero copy). A warm node is served by this module alone,
   with one request through the standard library's HTTP client; the rest is in
   ``podpull.py``. If the agent is down, refuses or fails and the tree is not already on
   the node:
2. fallback ``source``: pull from the source with the agent's own fetch engine into the
   emptyDir (resumable after a restart of this container), verified the same way, then move
   the files into place; fallback ``none``: fail with a clear message.
3. download mode: no side path at all; the agent is asked (without waiting) to warm the
   node, and the files come from the source as in 2.

Only an agent that cannot serve leads to the fallback (unreachable, silent past
``--reply-timeout``, an error, a failed pull, a reply that is not a model, a tree on the side
mount that does not match its manifest). An agent that refuses this pod (401, 403) is
final: nothing is linked and nothing downloaded, and the init container fails saying why. The
model's key follows the pod's namespace (``MODELCACHE_NAMESPACE``), credentials Secret and
policy (``common.reference.scoped``), as the webhook and the agent compute it.

Every file is checked before one is linked: a regular file (not a link, a directory or a
device), of the size the manifest gives, under directories that are not links; a tree that
fails is not linked at all (the mount path is left empty) and the agent counts as unusable.

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
import json
import logging
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.store.modeldir import ModelDir
from agent.store.names import join_inside
from agent.store.roles import Provider
from agent.store.trees import Manifest
from agent.verify import require_verified
from common import logs
from common.errors import ModelcacheError
from common.reference import KEY_HEX, Reference, scoped

# A warm node's path (ask the agent, link the tree) imports only the above and the
# standard library's HTTP client; agent/cli/podpull.py (asyncio, aiohttp, the fetch engine,
# the sources) only where a cold node, a fallback or download mode needs it.

log = logging.getLogger("modelcache.init")
WORK_DIR = ".modelcache"
#: the pod's namespace (downward API): a policy is the ConfigMap of that name there
NAMESPACE_ENV = "MODELCACHE_NAMESPACE"


MODEL_STATES = ("pulling", "ready", "failed")
_KEY = re.compile(rf"^[0-9a-f]{{{KEY_HEX}}}$")


class InitError(ModelcacheError):
    reason = "init"


class Refused(InitError):
    """The agent refuses this pod (401, 403): final, no link and no fallback."""

    reason = "refused"


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
    p.add_argument("--reply-timeout", type=float, default=10.0,
                   help="seconds a connected agent may take to answer before falling back")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level)
    started = time.monotonic()
    try:
        how = provide(args)
    except ModelcacheError as e:
        log.error("the model could not be provided", extra={"uri": args.uri, "error": str(e)})
        print(f"modelcache init: {e}", file=sys.stderr)
        return 1
    log.info("model in place", extra={"uri": args.uri, "how": how,
                                      "seconds": round(time.monotonic() - started, 3)})
    return 0


def provide(args: argparse.Namespace) -> str:
    """Fill the mount path; return how (``warm``, ``agent``, ``source``). A warm node is
    served here, without an event loop; everything else by :func:`run`."""
    ref = scoped(args.uri, args.include or None, namespace=os.environ.get(NAMESPACE_ENV) or None,
                 credentials=args.credentials, verify=args.verify)
    if not ref.cached:
        raise InitError(f"{ref.scheme}:// models are mounted directly; no init container needed")
    token = prepare(args)
    asked = ask_agent(args, ref, token) if args.mode == "cache" else None
    if asked is not None and asked.refused:
        raise Refused(f"the node's agent refuses this pod {ref.display}: {asked.error}")
    if asked is not None and asked.ready and link_side(args, ref.key, ref.verify):
        return "warm"
    import asyncio

    from agent.cli.podpull import run

    return asyncio.run(run(args, ref, token, asked))


@dataclass(frozen=True)
class Asked:
    """The agent's answer to the ensure: the model, or why there is none."""

    model: dict[str, Any] | None = None
    error: str | None = None
    refused: bool = False
    """401 or 403: the agent will not serve this pod (final)."""

    @property
    def ready(self) -> bool:
        return self.model is not None and self.model.get("state") == "ready"


def ask_agent(args: argparse.Namespace, ref: Reference, token: str | None) -> Asked:
    """``POST /api/v1/models`` to the node's agent (what ``AgentClient.ensure`` sends), with
    the standard library: the warm path's one request."""
    import http.client

    url = urlsplit(args.agent_url)
    body: dict[str, Any] = {"uri": ref.uri}
    if ref.include:
        body["include"] = list(ref.include)
    if args.credentials:
        body["credentials"] = args.credentials
    if args.verify:
        body["verify"] = args.verify
    body["warm"] = True  # this pod loads the model next: the agent warms the page cache
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        import ssl

        conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443,
                                           timeout=args.connect_timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80,
                                          timeout=args.connect_timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(args.reply_timeout)  # an ensure answers at once (202)
        conn.request("POST", url.path.rstrip("/") + "/api/v1/models",
                     body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        status, raw = resp.status, resp.read(MAX_REPLY + 1)
    except (OSError, http.client.HTTPException) as e:
        return Asked(error=f"cannot reach the agent at {args.agent_url}: "
                           f"{str(e) or type(e).__name__}")
    finally:
        conn.close()
    try:
        reply = json.loads(raw) if len(raw) <= MAX_REPLY else None
    except ValueError:
        reply = None
    if status >= 400:
        message = reply.get("error") if isinstance(reply, dict) else None
        text = message if isinstance(message, str) else f"HTTP {status}"
        return Asked(error=f"HTTP {status}: {text[:500]}", refused=status in (401, 403))
    problem = model_problem(reply)
    if problem is not None:
        return Asked(error=f"the agent's reply (HTTP {status}) is not a model: {problem}")
    assert isinstance(reply, dict)
    if reply.get("key") != ref.key:
        return Asked(error=f"the agent names the model {reply.get('key')}, this pod expects "
                           f"{ref.key}: not the same reference and policy")
    return Asked(model=reply)


MAX_REPLY = 1024 * 1024


def model_problem(reply: object) -> str | None:
    """What keeps ``reply`` from being a model of the admin API (``GET /api/v1/models/KEY``),
    as far as the init container reads one; None if it is one."""
    if not isinstance(reply, dict):
        return f"a JSON {type(reply).__name__}, not an object"
    key, state = reply.get("key"), reply.get("state")
    if not isinstance(key, str) or not _KEY.match(key):
        return "no model key"
    if state not in MODEL_STATES:
        return f"state {str(state)[:32]!r} is none of {', '.join(MODEL_STATES)}"
    for name in ("bytes_done", "size_bytes"):
        value = reply.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} is not a number of bytes"
    if reply.get("error") is not None and not isinstance(reply.get("error"), str):
        return "error is not text"
    return None


def prepare(args: argparse.Namespace) -> str | None:
    """Create and empty the mount path (a restarted init container starts clean, keeping
    its work directory to resume); return the agent token."""
    args.mount_path.mkdir(parents=True, exist_ok=True)
    clear(args.mount_path)
    return _read_token(args.token_file)


def link_side(args: argparse.Namespace, key: str, policy: str = "") -> bool:
    """Link the tree the side mount shows; False if it shows none, or one that does not
    match its manifest (then nothing is linked). With a policy, a tree without a passing
    check under it is refused (:class:`VerificationFailed`)."""
    side = ModelDir(args.side_path, key)
    manifest = side.manifest(key)
    if manifest is None:
        return False
    require_verified(manifest, policy)
    try:
        link_tree(side, manifest, args.mount_path)
    except (InitError, OSError, ModelcacheError) as e:
        log.warning("the tree on the node is not usable", extra={"key": key, "error": str(e)})
        clear(args.mount_path)  # nothing half-linked: the fallback starts from empty
        return False
    shutil.rmtree(args.mount_path / WORK_DIR, ignore_errors=True)
    return True


def link_tree(side: Provider, manifest: Manifest, mount: Path) -> None:
    """Symlink every file of the tree into the mount path (absolute links: the app
    containers mount the side path at the same place), once every file was checked
    (:func:`check_tree`)."""
    tree = side.tree_path(manifest)
    targets = check_tree(tree, manifest)
    made: set[Path] = set()
    for f, target in zip(manifest.files, targets, strict=True):
        link = join_inside(mount, f.path)
        if link.parent not in made:
            link.parent.mkdir(parents=True, exist_ok=True)
            made.add(link.parent)
        os.symlink(target, link)


def check_tree(tree: Path, manifest: Manifest) -> list[Path]:
    """Each file's path in the tree, after checking that it is what the manifest says: a
    regular file (not a link, a directory or a device) of the manifest's size, under
    directories of the tree that are directories, not links; :class:`InitError` naming the
    first that is not."""
    dirs: set[Path] = {tree}
    targets = []
    for f in manifest.files:
        target = join_inside(tree, f.path)
        for parent in reversed(target.relative_to(tree).parents[:-1]):
            path = tree / parent
            if path not in dirs:
                if not _is(path, stat.S_ISDIR):
                    raise InitError(f"tree {manifest.tree}: {parent} is not a directory")
                dirs.add(path)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise InitError(f"tree {manifest.tree} is missing {f.path}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InitError(f"tree {manifest.tree}: {f.path} is not a regular file")
        if st.st_size != f.size:
            raise InitError(f"tree {manifest.tree}: {f.path} has {st.st_size} bytes, its "
                            f"manifest says {f.size}")
        targets.append(target)
    return targets


def _is(path: Path, kind: Any) -> bool:
    try:
        return bool(kind(os.lstat(path).st_mode))
    except OSError:
        return False


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
