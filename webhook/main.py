"""``modelcache webhook``: the composition root. Flags and environment are read here, once.

    modelcache webhook [--listen HOST:PORT] --tls-cert FILE --tls-key FILE
                       [--store-path DIR] [--agent-url URL] [--image IMAGE]
                       [--namespace NS] [--allow-host HOST ...]
                       [--pod-security-default LEVEL] [--pod-security-exempt NS ...]
                       [--pod-security-config FILE] [--counts-interval S]
    modelcache webhook certs --service NAME --namespace NS
                       [--secret NAME] [--out-dir DIR] [--webhook-config NAME]
                       [--days N] [--renew-before-days N]

With cluster access it also watches namespaces and, while it holds the Lease
``modelcache-counts`` in its namespace, runs the counts controller (``counts.py``).

Shutdown on SIGTERM: not ready -> keep serving for ``--shutdown-delay`` (endpoints drop the
pod) -> close the listener -> finish in-flight reviews -> stop background work (the Lease is
released) -> close the API client.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import logging
import os
import posixpath
import re
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from common import logs
from common.errors import InvalidInput, ModelcacheError
from common.hosts import AllowList
from common.kube.client import Found, KubeClient, connect, find_config
from common.kube.lease import LeaderElection

from . import certs
from .admission import Context
from .counts import Counts
from .metrics import WebhookMetrics
from .namespaces import NamespaceCache, NamespaceWatch
from .plan import PSA_LEVELS
from .server import Deps, make_runner
from .settings import (
    DEFAULT_IMAGE,
    DEFAULT_NAMESPACE,
    INIT_ENV_NAMES,
    PlanSettings,
    ServerSettings,
    agent_url_for,
)
from .tls import CertReloader

#: the webhook's own log lines (aiohttp's and the libraries' come out beside them, alike)
LOGGER = "webhook"


def main(argv: list[str]) -> int:
    """Run ``modelcache webhook`` with the arguments after ``webhook``; the exit status."""
    env = dict(os.environ)
    if argv[:1] == ["certs"]:
        return _certs(argv[1:], env)
    try:
        args = serve_parser(env).parse_args(argv)
        server, planning = settings_from(args)
    except SystemExit as e:
        return int(e.code or 0)
    logs.setup(args.log_level)
    log = logging.getLogger(LOGGER)
    try:
        return asyncio.run(serve(server, planning, env, log))
    except KeyboardInterrupt:
        return 130


def serve_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The flags of ``modelcache webhook`` (defaults from ``env``: ``POD_NAMESPACE``)."""
    p = argparse.ArgumentParser(prog="modelcache webhook",
                                description="Mutating admission webhook that mounts models.")
    p.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT")
    p.add_argument("--tls-cert", required=True, metavar="FILE")
    p.add_argument("--tls-key", required=True, metavar="FILE")
    p.add_argument("--store-path", default=PlanSettings.store_path, metavar="DIR",
                   help="the agent's store root on every node")
    p.add_argument("--agent-url", default=None, metavar="URL",
                   help="the agent Service (internalTrafficPolicy: Local); default "
                        "http://modelcache-agent.NAMESPACE.svc:9400")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="init container image (pinned)")
    p.add_argument("--namespace", default=env.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
                   help="the webhook's own namespace (never mutated)")
    p.add_argument("--csi", action="store_true",
                   help="the modelcache CSI driver (csi.modelcache.io) is installed: mode csi "
                   "is allowed and is the default in every namespace")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow a model host that is localhost or a private address")
    p.add_argument("--init-env", action="append", default=[], metavar="NAME=VALUE",
                   help="where the init container's own download finds the sources "
                        f"(repeatable; NAME one of {', '.join(INIT_ENV_NAMES)})")
    p.add_argument("--init-ca-file", metavar="FILE",
                   help="PEM bundle of CAs that download trusts (a private CA's mirror)")
    p.add_argument("--require-verify", action="append", default=[], metavar="NAMESPACE",
                   help="pods in this namespace (a name or a glob such as 'prod-*'; "
                   "repeatable) must name a signature policy (modelcache.io/verify)")
    p.add_argument("--pod-security-default", choices=PSA_LEVELS, default=None, metavar="LEVEL",
                   help="the cluster's default Pod Security enforce level (privileged, "
                   "baseline, restricted): a namespace without the enforce label gets it")
    p.add_argument("--pod-security-exempt", action="append", default=[], metavar="NAMESPACE",
                   help="a namespace the PodSecurity admission configuration exempts "
                   "(repeatable)")
    p.add_argument("--pod-security-config", metavar="FILE",
                   help="the API server's AdmissionConfiguration (or its PodSecurity "
                   "configuration): defaults.enforce and exemptions.namespaces are read "
                   "from it; the two flags above add to it")
    p.add_argument("--init-cpu-limit", default=PlanSettings.init_cpu_limit, metavar="CPU",
                   help="CPU limit of the injected init container")
    p.add_argument("--cert-poll-seconds", type=float, default=ServerSettings.cert_poll_seconds)
    p.add_argument("--shutdown-delay", type=float,
                   default=ServerSettings.shutdown_delay_seconds, metavar="SECONDS")
    p.add_argument("--max-body-bytes", type=int, default=ServerSettings.max_body_bytes)
    p.add_argument("--counts-interval", type=float, default=ServerSettings.counts_interval,
                   metavar="SECONDS",
                   help="least seconds between two writes of one CachedModel's counts")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def settings_from(args: argparse.Namespace) -> tuple[ServerSettings, PlanSettings]:
    """Settings from parsed flags; argparse-style exit on a bad value."""
    host, port = _listen(args.listen)
    store = str(args.store_path)
    if not store.startswith("/") or posixpath.normpath(store) != store or store == "/":
        _fail(f"--store-path {store!r} must be a clean absolute path")
    try:
        AllowList(args.allow_host)
    except InvalidInput as e:
        _fail(f"--{e}")
    image = str(args.image)
    if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        _fail(f"--image {image!r} must be pinned to a tag or digest other than latest")
    server = ServerSettings(
        host=host, port=port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        cert_poll_seconds=args.cert_poll_seconds, max_body_bytes=args.max_body_bytes,
        namespace=args.namespace, shutdown_delay_seconds=args.shutdown_delay,
        counts_interval=args.counts_interval,
    )
    planning = PlanSettings(
        csi=args.csi, store_path=store, agent_url=args.agent_url or agent_url_for(args.namespace),
        image=image, allow_hosts=tuple(args.allow_host),
        init_env=tuple(_init_env(item) for item in args.init_env),
        init_ca_pem=_init_ca_pem(args.init_ca_file) if args.init_ca_file else "",
        require_verify=tuple(_namespace_glob(g) for g in args.require_verify),
        **_pod_security(args), init_cpu_limit=_cpu(args.init_cpu_limit),
    )
    return server, planning


def _pod_security(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster's default Pod Security level and exempt namespaces: the admission
    configuration's (``--pod-security-config``), then the flags."""
    default, exempt = "privileged", list(args.pod_security_exempt)
    if args.pod_security_config:
        try:
            default, listed = read_pod_security_config(Path(args.pod_security_config))
        except (OSError, ValueError) as e:
            _fail(f"--pod-security-config {args.pod_security_config}: {e}")
        exempt = [*listed, *exempt]
    for name in exempt:
        if not _NAMESPACE.match(name):
            _fail(f"--pod-security-exempt {name!r} is not a namespace name")
    return {"pod_security_default": args.pod_security_default or default,
            "pod_security_exempt": tuple(dict.fromkeys(exempt))}


def read_pod_security_config(path: Path) -> tuple[str, list[str]]:
    """``defaults.enforce`` and ``exemptions.namespaces`` of a PodSecurity configuration
    (``pod-security.admission.config.k8s.io``), alone or inside the API server's
    AdmissionConfiguration (the ``PodSecurity`` plugin's ``configuration``, or its ``path``
    relative to the file); ValueError naming what is wrong."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"not YAML: {e}") from None
    if isinstance(doc, dict) and doc.get("kind") == "AdmissionConfiguration":
        plugin = next((p for p in doc.get("plugins") or [] if isinstance(p, dict)
                       and p.get("name") == "PodSecurity"), None)
        if plugin is None:
            raise ValueError("the AdmissionConfiguration has no PodSecurity plugin")
        if plugin.get("path"):
            return read_pod_security_config(path.parent / str(plugin["path"]))
        doc = plugin.get("configuration")
    if not isinstance(doc, dict) or doc.get("kind") != "PodSecurityConfiguration":
        raise ValueError("not a PodSecurityConfiguration (nor an AdmissionConfiguration "
                         "holding one)")
    level = (doc.get("defaults") or {}).get("enforce", "privileged")
    if level not in PSA_LEVELS:
        raise ValueError(f"defaults.enforce {str(level)[:32]!r} is none of "
                         f"{', '.join(PSA_LEVELS)}")
    namespaces = (doc.get("exemptions") or {}).get("namespaces") or []
    if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
        raise ValueError("exemptions.namespaces is not a list of names")
    return level, namespaces


_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_CPU = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]{1,3})?)$")


def _cpu(text: str) -> str:
    if not _CPU.match(text) or text in ("0", "0m"):
        _fail(f"--init-cpu-limit {text!r} is not a CPU quantity (e.g. 1, 500m)")
    return text


def _namespace_glob(glob: str) -> str:
    glob = glob.strip()
    if not glob or not all(c in "abcdefghijklmnopqrstuvwxyz0123456789-*?[]"
                           for c in glob):
        _fail(f"--require-verify {glob!r} is not a namespace name or glob")
    return glob


def _init_env(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not value:
        _fail(f"--init-env {item!r} must be NAME=VALUE")
    if name not in INIT_ENV_NAMES:
        _fail(f"--init-env {name}: not one of {', '.join(INIT_ENV_NAMES)} (credentials go "
              "in the pod's credentials Secret, not in its spec)")
    return name, value


def _init_ca_pem(path: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"--init-ca-file {path}: {e}")
    if "-----BEGIN CERTIFICATE-----" not in text:
        _fail(f"--init-ca-file {path}: not a PEM bundle of certificates")
    return text


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        _fail(f"--listen {text!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _fail(message: str) -> None:
    print(f"modelcache webhook: error: {message}", file=sys.stderr)
    raise SystemExit(2)


async def _connect(env: Mapping[str, str], log: logging.Logger) -> KubeClient | None:
    """The API client, or None (said once, with why) when there is no cluster access."""
    found, why = find_config(env)
    kube: KubeClient | None = None
    if found is not None:
        try:
            kube = await connect_to(found, env)
        except InvalidInput as e:
            why = str(e)
    if kube is None:
        log.warning("no cluster access: namespace labels unknown, mode defaults to cache",
                    extra={"why": why})
        return None
    log.info("watching namespaces; counting CachedModels' nodes while holding the lease",
             extra={"config": found.source if found else ""})
    return kube


async def connect_to(found: Found, env: Mapping[str, str]) -> KubeClient:
    """A client from the configuration :func:`find_config` found (``InvalidInput`` if it
    is not usable)."""
    kubeconfig = str(found.kubeconfig) if found.kubeconfig else None
    return await connect(kubeconfig, environ=env)


def _counts(kube: KubeClient, server: ServerSettings) -> Callable[[], Awaitable[None]]:
    """The counts controller, run by the replica that holds the Lease."""
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    election = LeaderElection(kube, server.namespace, server.counts_lease, identity)
    return lambda: election.run(lambda: Counts(kube, server.counts_interval).run())


async def serve(
    server: ServerSettings, planning: PlanSettings, env: Mapping[str, str],
    log: logging.Logger,
) -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    metrics = WebhookMetrics()
    try:
        reloader = CertReloader(server.tls_cert, server.tls_key, log,
                                metrics.cert_reloaded, metrics.cert_loaded)
    except (OSError, ValueError) as e:
        log.error("cannot load the TLS certificate", extra={"error": str(e)})
        return 1
    background: list[Callable[[], Awaitable[None]]] = [
        lambda: reloader.run(server.cert_poll_seconds)
    ]
    kube = await _connect(env, log)
    cache = NamespaceCache()
    if kube is not None:
        watch = NamespaceWatch(kube.watch_namespaces())
        cache = watch.cache
        background.append(watch.run)
        background.append(_counts(kube, server))
    deps = Deps(
        admission=Context(planning, server.namespace, cache.labels),
        metrics=metrics, log=log, max_body_bytes=server.max_body_bytes,
        background=tuple(background),
    )
    runner = make_runner(deps, server.shutdown_timeout_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        site = web.TCPSite(runner, server.host, server.port, ssl_context=reloader.context)
        await site.start()
        gc.freeze()  # start-up objects (schemas, modules) never need collecting: fewer pauses
        bound = [f"https://{a[0]}:{a[1]}" if ":" not in a[0] else f"https://[{a[0]}]:{a[1]}"
                 for a in runner.addresses]
        log.info("serving", extra={"listen": bound, "agent": planning.agent_url,
                                   "image": planning.image})
        await stop.wait()
        log.info("stopping: not ready, draining")
        deps.health.ready = False
        await asyncio.sleep(server.shutdown_delay_seconds)
    finally:
        await runner.cleanup()
        if kube is not None:
            await kube.close()
        reloader.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


# --- certs ----------------------------------------------------------------------------------


def certs_parser() -> argparse.ArgumentParser:
    """The flags of ``modelcache webhook certs``."""
    p = argparse.ArgumentParser(
        prog="modelcache webhook certs",
        description="Mint a CA and a serving certificate for the webhook Service, or keep "
                    "the good pair a Secret already holds; print the caBundle (base64 of the "
                    "CA PEM).")
    p.add_argument("--service", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--secret", metavar="NAME",
                   help="kubernetes.io/tls Secret in NAMESPACE to create or renew (tls.crt, "
                        "tls.key, ca.crt); needs cluster access")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help="also (or only) write ca.crt, tls.crt and tls.key here")
    p.add_argument("--webhook-config", metavar="NAME",
                   help="MutatingWebhookConfiguration whose caBundle to patch (needs access)")
    p.add_argument("--days", type=int, default=365, help="serving certificate lifetime")
    p.add_argument("--renew-before-days", type=int, default=certs.RENEW_BEFORE.days,
                   metavar="N", help="with --secret: re-mint a pair expiring within N days")
    return p


def _certs(argv: list[str], env: Mapping[str, str]) -> int:
    p = certs_parser()
    try:
        args = p.parse_args(argv)
        if not (args.secret or args.out_dir):
            p.error("give --secret NAME, --out-dir DIR, or both")
        if args.secret and args.days <= args.renew_before_days:
            p.error("--days must be more than --renew-before-days (or every run re-mints)")
    except SystemExit as e:
        return int(e.code or 0)
    found, why = find_config(env)
    if args.secret:
        if found is None:
            print(f"no cluster access ({why}): cannot write Secret "
                  f"{args.namespace}/{args.secret}", file=sys.stderr)
            return 1
        return asyncio.run(_in_cluster(found, env, f"Secret {args.namespace}/{args.secret}",
                                       lambda kube: _ensure(kube, args)))
    minted = certs.mint(args.service, args.namespace, days=args.days)
    paths = certs.write(minted, args.out_dir)
    print(minted.ca_bundle)
    names = ", ".join(certs.dns_names(args.service, args.namespace))
    print(f"wrote {', '.join(str(p) for p in paths.values())} for {names}", file=sys.stderr)
    if not args.webhook_config:
        return 0
    if found is None:
        print(f"no cluster access ({why}): caBundle of {args.webhook_config} not patched",
              file=sys.stderr)
        return 0
    name = args.webhook_config
    return asyncio.run(_in_cluster(found, env, f"patching {name}",
                                   lambda kube: _patch_with(kube, name, minted.ca_bundle)))


async def _in_cluster(found: Found, env: Mapping[str, str], what: str,
                      job: Callable[[KubeClient], Awaitable[int]]) -> int:
    """``job``'s exit status with a client of the cluster; 1, saying ``what`` failed, when
    the client cannot be made or an API call of ``job`` fails."""
    try:
        kube = await connect_to(found, env)
    except InvalidInput as e:
        print(f"{what} failed: {e}", file=sys.stderr)
        return 1
    async with kube:
        try:
            return await job(kube)
        except (ModelcacheError, OSError) as e:
            print(f"{what} failed: {e}", file=sys.stderr)
            return 1


async def _ensure(kube: KubeClient, args: argparse.Namespace) -> int:
    """The Secret (kept or re-minted), then the files and the caBundle from what it holds."""
    ensured = await certs.ensure_secret(
        kube, args.secret, args.service, args.namespace, days=args.days,
        renew_before=datetime.timedelta(days=args.renew_before_days))
    print(f"Secret {args.namespace}/{args.secret} {ensured.action}"
          + (f": {ensured.why}" if ensured.why else ""), file=sys.stderr)
    if args.out_dir:
        certs.write(ensured.pair, args.out_dir)
    print(ensured.pair.ca_bundle)
    if not args.webhook_config:
        return 0
    return await _patch_with(kube, args.webhook_config, ensured.pair.ca_bundle)


async def _patch_with(kube: KubeClient, name: str, ca_bundle: str) -> int:
    try:
        count = await certs.patch_ca_bundle(kube, name, ca_bundle)
    except ModelcacheError as e:
        print(f"patching {name} failed: {e}", file=sys.stderr)
        return 1
    if count:
        print(f"patched caBundle of {count} webhook(s) in {name}", file=sys.stderr)
    else:
        print(f"caBundle of {name} already current", file=sys.stderr)
    return 0
