"""Build :class:`AgentSettings` once at start-up from flags, environment and the config file.

The config file (YAML, ``--config``) is validated against a JSON schema; every error names
the field. Flags override the file; ``--allow-host`` and ``--allow-path`` add to it.

.. code-block:: yaml

    store: {path: /var/lib/modelcache, highWatermark: 0.8, lowWatermark: 0.7,
            quotaBytes: 500000000000, minFreeInodes: 0.05, evictInterval: 10}
    allowHosts: ["registry.internal:5000", "*.mirror.corp", "10.20.0.0/16"]
    onlyAllowedHosts: false
    allowPaths: [/mnt/seed]
    caFile: /etc/modelcache/ca/ca.crt
    refreshInterval: 3600
    ociPlainHttp: ["registry.internal:5000"]
    sources: {hfEndpoint: "https://hf-mirror.internal", s3Endpoint: "http://minio.data:9000",
              s3Region: us-east-1, s3Addressing: path,
              modelRegistry: "model-registry.kubeflow:8080", modelRegistryScheme: https}
    fetch: {connectionsPerFile: 6, maxConnections: 32, maxFiles: 4}
    pageCache: {enabled: true, minAvailable: 0.15, maxShare: 0.5, rateBytes: 1073741824}
    models:
      - uri: hf://Qwen/Qwen2.5-0.5B@main
        include: ["*.json", "*.safetensors"]
        pin: true
        verify: release-key
    verifyPolicies:
      release-key: {publicKey: /etc/modelcache/keys/release.pub}
      corp-ca: {certificateChain: /etc/modelcache/ca/signing-chain.pem, signature: sig/model.sig}
      ci: {sigstore: {identity: ci@example.com, issuer: "https://issuer.example.com",
                      trustRoot: /etc/modelcache/sigstore/trust_config.json}}
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from agent.egress import tls_context
from agent.settings import (
    AgentSettings,
    ApiSettings,
    ClusterSettings,
    CsiSettings,
    EgressSettings,
    FetchSettings,
    PageCacheSettings,
    PolicyFiles,
    SourceSettings,
    StoreSettings,
    WarmModel,
)
from common.errors import InvalidInput
from common.hosts import AllowList
from common.kube.settings import KubeSettings
from common.reference import check_policy_name, parse

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_RATIO = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_ABSOLUTE = {"type": "string", "pattern": "^/"}
POLICY_METHODS = ("publicKey", "certificateChain", "sigstore")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "store": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "highWatermark": _RATIO,
                "lowWatermark": _RATIO,
                "quotaBytes": _POSITIVE_INT,
                "minFreeInodes": {"type": "number", "minimum": 0, "maximum": 1},
                "evictInterval": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "allowHosts": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "onlyAllowedHosts": {"type": "boolean"},
        "allowSchemes": {"type": "array", "items": {
            "enum": ["hf", "s3", "oci", "http", "https", "model-registry", "file"]}},
        "allowPaths": {"type": "array", "items": {"type": "string", "pattern": "^/"}},
        "caFile": {"type": "string", "pattern": "^/"},
        "refreshInterval": {"type": "number", "minimum": 0},
        "ociPlainHttp": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "sources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "hfEndpoint": {"type": "string", "pattern": "^https?://"},
                "s3Endpoint": {"type": "string", "pattern": "^https?://"},
                "s3Region": {"type": "string", "minLength": 1},
                "s3Addressing": {"enum": ["auto", "path", "virtual"]},
                "modelRegistry": {"type": "string", "minLength": 1},
                "modelRegistryScheme": {"enum": ["http", "https"]},
            },
        },
        "fetch": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "connectionsPerFile": _POSITIVE_INT,
                "maxConnections": _POSITIVE_INT,
                "maxFiles": _POSITIVE_INT,
                "retries": _POSITIVE_INT,
            },
        },
        "pageCache": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "minAvailable": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "maxShare": _RATIO,
                "rateBytes": {"type": "integer", "minimum": 0},
                "chunkBytes": {"type": "integer", "minimum": 4096, "maximum": 1 << 30},
                "waitReady": {"type": "number", "minimum": 0},
            },
        },
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["uri"],
                "properties": {
                    "uri": {"type": "string", "minLength": 1},
                    "include": {"type": "array", "items": {"type": "string"}},
                    "pin": {"type": "boolean"},
                    "verify": {"type": "string", "minLength": 1},
                },
            },
        },
        "verifyPolicies": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "publicKey": _ABSOLUTE,
                    "certificateChain": _ABSOLUTE,
                    "sigstore": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["identity", "issuer", "trustRoot"],
                        "properties": {
                            "identity": {"type": "string", "minLength": 1},
                            "issuer": {"type": "string", "minLength": 1},
                            "trustRoot": _ABSOLUTE,
                        },
                    },
                    "signature": {"type": "string", "minLength": 1},
                },
            },
        },
    },
}


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate a config file; raise :class:`InvalidInput` naming the problem."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise InvalidInput(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InvalidInput(f"config file {path} is not valid YAML: {e}") from e
    try:
        jsonschema.validate(data, SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise InvalidInput(f"config file {path}: {where}: {e.message}") from e
    policies = data.get("verifyPolicies", {})
    for name, policy in policies.items():
        try:
            check_policy_name(name)
        except InvalidInput as e:
            raise InvalidInput(f"config file {path}: verifyPolicies: {e}") from e
        methods = [m for m in POLICY_METHODS if m in policy]
        if len(methods) != 1:
            raise InvalidInput(f"config file {path}: verifyPolicies/{name}: needs exactly one "
                               f"of {', '.join(POLICY_METHODS)} (has "
                               f"{', '.join(methods) or 'none'})")
    for i, model in enumerate(data.get("models", [])):
        try:
            parse(model["uri"], model.get("include"))
        except InvalidInput as e:
            raise InvalidInput(f"config file {path}: models/{i}/uri: {e}") from e
        if "verify" in model and model["verify"] not in policies:
            raise InvalidInput(f"config file {path}: models/{i}/verify: no policy "
                               f"{model['verify']!r} in verifyPolicies")
    return data


def agent_settings(args: argparse.Namespace) -> AgentSettings:
    """Settings for ``modelcache agent`` from its parsed flags (and the config file)."""
    cfg = load_config(Path(args.config)) if args.config else {}
    store_cfg = cfg.get("store", {})
    store = StoreSettings(
        path=Path(args.store or store_cfg.get("path") or StoreSettings.path),
        high_watermark=args.high_watermark or store_cfg.get("highWatermark",
                                                            StoreSettings.high_watermark),
        low_watermark=args.low_watermark or store_cfg.get("lowWatermark",
                                                          StoreSettings.low_watermark),
        quota_bytes=args.quota_bytes or store_cfg.get("quotaBytes"),
        min_free_inodes=store_cfg.get("minFreeInodes", StoreSettings.min_free_inodes),
        evict_interval=float(store_cfg.get("evictInterval", StoreSettings.evict_interval)),
    )
    if store.low_watermark >= store.high_watermark:
        raise InvalidInput(
            f"low watermark {store.low_watermark} must be below the high watermark "
            f"{store.high_watermark}")
    egress = EgressSettings(
        allow_hosts=(*cfg.get("allowHosts", ()), *(args.allow_host or ())),
        only_allowed_hosts=cfg.get("onlyAllowedHosts", False),
        allow_schemes=tuple(cfg.get("allowSchemes", EgressSettings.allow_schemes)),
        allow_paths=tuple(Path(p) for p in (*cfg.get("allowPaths", ()),
                                            *(args.allow_path or ()))),
        ca_file=_ca_file(args.ca_file or cfg.get("caFile")),
    )
    AllowList(egress.allow_hosts)  # a bad entry is refused here, naming it
    fetch_cfg = cfg.get("fetch", {})
    fetch = replace(
        FetchSettings(),
        **{field: fetch_cfg[name] for name, field in (
            ("connectionsPerFile", "connections_per_file"), ("maxConnections", "max_connections"),
            ("maxFiles", "max_files"), ("retries", "retries")) if name in fetch_cfg},
    )
    token_file = Path(args.token_file) if args.token_file else store.path / "admin-token"
    api = ApiSettings(listen=args.listen, token_file=token_file)
    warm = tuple(WarmModel(m["uri"], tuple(m.get("include", ())), bool(m.get("pin", False)),
                           m.get("verify", ""))
                 for m in cfg.get("models", ()))
    node = args.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    sources = SourceSettings.from_config(cfg.get("sources", {}), os.environ,
                                         oci_plain_http=tuple(cfg.get("ociPlainHttp", ())))
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    kube = KubeSettings(kubeconfig=Path(kubeconfig) if kubeconfig else None)
    cluster = ClusterSettings(
        audiences=tuple(args.audience or ClusterSettings.audiences),
        startup_jitter=(args.startup_jitter if args.startup_jitter is not None
                        else ClusterSettings.startup_jitter),
    )
    if cluster.startup_jitter < 0:
        raise InvalidInput("--startup-jitter must not be negative")
    page_cfg = cfg.get("pageCache", {})
    page_cache = replace(
        PageCacheSettings(),
        **{field: page_cfg[name] for name, field in (
            ("enabled", "enabled"), ("minAvailable", "min_available"),
            ("maxShare", "max_share"), ("rateBytes", "rate_bytes"),
            ("chunkBytes", "chunk_bytes"), ("waitReady", "wait_ready")) if name in page_cfg},
    )
    return AgentSettings(
        node_name=node, standalone=args.standalone,
        refresh_interval=float(cfg.get("refreshInterval", AgentSettings.refresh_interval)),
        store=store, fetch=fetch, egress=egress, api=api, warm=warm, sources=sources,
        kube=kube, cluster=cluster, csi=_csi(args), page_cache=page_cache,
        verify_policies=policy_files(cfg.get("verifyPolicies", {})),
    )


def _csi(args: argparse.Namespace) -> CsiSettings:
    endpoint = args.csi_endpoint
    if endpoint is not None and not (endpoint.startswith("unix:///") and len(endpoint) > 8):
        raise InvalidInput(f"--csi-endpoint {endpoint!r}: expected unix:///ABSOLUTE/PATH")
    wait = CsiSettings.publish_wait if args.csi_publish_wait is None else args.csi_publish_wait
    if not 0 <= wait <= 110:  # kubelet gives a NodePublishVolume two minutes
        raise InvalidInput("--csi-publish-wait must be between 0 and 110 seconds")
    return CsiSettings(endpoint=endpoint, publish_wait=wait,
                       kubelet_dir=Path(args.csi_kubelet_dir or CsiSettings.kubelet_dir))


def policy_files(policies: dict[str, Any]) -> tuple[PolicyFiles, ...]:
    """The config file's ``verifyPolicies`` (validated) as settings."""
    out = []
    for name, p in sorted(policies.items()):
        sigstore = p.get("sigstore") or {}
        out.append(PolicyFiles(
            name=name,
            public_key=Path(p["publicKey"]) if "publicKey" in p else None,
            certificate_chain=Path(p["certificateChain"]) if "certificateChain" in p else None,
            sigstore_identity=sigstore.get("identity", ""),
            sigstore_issuer=sigstore.get("issuer", ""),
            trust_root=Path(sigstore["trustRoot"]) if sigstore else None,
            signature=p.get("signature", PolicyFiles.signature)))
    return tuple(out)


def add_agent_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standalone", action="store_true",
                   help="run without a cluster (node name from the host, token from a file)")
    p.add_argument("--store", help="store directory (default /var/lib/modelcache)")
    p.add_argument("--listen", default="127.0.0.1:9400", help="admin API address HOST:PORT")
    p.add_argument("--token-file", help="bearer token for writes (created if missing; "
                   "default STORE/admin-token)")
    p.add_argument("--config", help="YAML config file (models to keep warm, allowlist, ...)")
    p.add_argument("--allow-host", action="append", metavar="HOST[:PORT]",
                   help="allow a host even on private/loopback addresses (repeatable)")
    p.add_argument("--allow-path", action="append", metavar="DIR",
                   help="allow file:// sources under DIR (repeatable)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="PEM bundle of CAs trusted for sources on top of the system's "
                   "(mirrors signed by a private CA)")
    p.add_argument("--credentials-dir", metavar="DIR",
                   help="standalone credentials: DIR/<name>/<key> files, like a Secret")
    p.add_argument("--node-name", help="node name (default $NODE_NAME or the host name)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="cluster mode: kubeconfig (default $KUBECONFIG, else the pod's "
                   "in-cluster service account)")
    p.add_argument("--audience", action="append", metavar="AUDIENCE",
                   help="cluster mode: audience callers' tokens must carry (repeatable; "
                   "default modelcache)")
    p.add_argument("--startup-jitter", type=float, metavar="SECONDS",
                   help="cluster mode: the first pulls wait up to this long, a fraction "
                   "derived from the node name (default 30)")
    p.add_argument("--csi-endpoint", metavar="unix:///PATH",
                   help="serve the CSI node service (driver csi.modelcache.io) on this socket")
    p.add_argument("--csi-publish-wait", type=float, metavar="SECONDS",
                   help="CSI: how long a publish waits for a model being pulled before "
                   "answering UNAVAILABLE with its progress (default 30)")
    p.add_argument("--csi-kubelet-dir", metavar="DIR",
                   help="CSI: kubelet's root directory; targets must be under DIR/pods "
                   "(default /var/lib/kubelet)")
    p.add_argument("--high-watermark", type=float, help="start evicting at this used ratio")
    p.add_argument("--low-watermark", type=float, help="stop evicting at this used ratio")
    p.add_argument("--quota-bytes", type=int, help="cap on the cache's own bytes")
    p.add_argument("--log-level", default="info")


def _ca_file(value: str | None) -> Path | None:
    """The CA bundle, checked now: a wrong path or a file without a certificate is named
    at start-up, not at the first HTTPS pull."""
    if not value:
        return None
    path = Path(value)
    try:
        tls_context(path)  # as the agent will load it
    except FileNotFoundError:
        raise InvalidInput(f"caFile {path}: no such file") from None
    except (OSError, ssl.SSLError) as e:
        raise InvalidInput(f"caFile {path}: not a PEM bundle of CA certificates ({e})") from None
    return path
