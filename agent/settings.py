"""Settings: frozen dataclasses grouped by concern, read once at start-up, passed down.

Every field has a default and says what it does. ``agent/config.py`` builds these from
flags, environment and the config file; nothing reads the environment after start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.kube.settings import KubeSettings

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class StoreSettings:
    path: Path = Path("/var/lib/modelcache")
    """Root of the content-addressed store on the node."""

    high_watermark: float = 0.80
    """Fraction of the store's filesystem in use at which eviction starts."""

    low_watermark: float = 0.70
    """Fraction of the store's filesystem in use at which eviction stops."""

    quota_bytes: int | None = None
    """Optional cap on the bytes the cache itself may hold (blobs), whatever the disk."""

    min_free_inodes: float = 0.05
    """Fraction of the filesystem's inodes that must stay free (evict below it)."""

    evict_interval: float = 10.0
    """Seconds between two checks of the watermarks, the quota and the inode floor (each
    pull is also checked before it starts)."""


@dataclass(frozen=True)
class FetchSettings:
    connections_per_file: int = 8
    """Most parallel ranged connections for one large file. A file starts with one; while
    its streams are slower than ``split_below_rate`` they double every other ``split_interval``
    (as long as that raises the file's rate)."""

    split_below_rate: int = 64 * MiB
    """Bytes per second per stream below which a file gets another connection."""

    split_interval: float = 0.25
    """Seconds between two looks at a file's streams."""

    max_connections: int = 32
    """Connections open at once across all pulls (bounds threads and sockets). 32 streams of
    ~40 MB/s (what one connection to Hugging Face's CDN gets) fill ~10 Gbit/s."""

    max_files: int = 4
    """Files downloaded at once within one pull."""

    segment_min_bytes: int = 16 * MiB
    """A slow file's streams take the rest of it in pieces of this size, in order (smaller
    ones at its end)."""

    buffer_bytes: int = 1 * MiB
    """Receive buffer per connection (reused: no new bytes object per chunk)."""

    checkpoint_bytes: int = 64 * MiB
    """Progress of a partial download is made durable (fdatasync + state) this often, and
    at least every ``checkpoint_seconds``: a restart re-fetches at most that much."""

    checkpoint_seconds: float = 1.0
    """Longest time between two checkpoints of a download that is making progress."""

    retries: int = 8
    """Attempts per segment before the pull fails (resets, 5xx, 429, short bodies)."""

    backoff_base: float = 0.25
    """First retry delay in seconds; doubles each attempt, with full jitter."""

    backoff_max: float = 30.0
    """Longest wait between attempts of our own choosing. A wait the server asks for
    (``Retry-After``, a ``RateLimit`` window's reset) is honoured up to 10 minutes."""

    connect_timeout: float = 15.0
    """Seconds to establish a connection (TCP + TLS)."""

    read_timeout: float = 60.0
    """Seconds without a byte before a connection is considered stalled."""

    max_redirects: int = 5
    """Redirect hops followed; every hop is checked against the egress policy."""


@dataclass(frozen=True)
class EgressSettings:
    allow_hosts: tuple[str, ...] = ()
    """Hosts (``name``, ``name:port``, ``*.domain``, an IP or a CIDR) allowed even when
    they resolve to loopback, link-local or private addresses."""

    only_allowed_hosts: bool = False
    """Refuse every host not in ``allow_hosts`` (strict allowlist), not just private ones."""

    allow_schemes: tuple[str, ...] = ("hf", "s3", "oci", "http", "https", "model-registry", "file")
    """Source schemes the agent accepts."""

    allow_paths: tuple[Path, ...] = ()
    """Directories under which ``file://`` references may read. Empty: ``file://`` refused."""

    ca_file: Path | None = None
    """PEM bundle of CAs trusted for every source on top of the system's (in-cluster
    mirrors, registries and object stores whose certificates a private CA signed)."""


@dataclass(frozen=True)
class SourceSettings:
    hf_endpoint: str = "https://huggingface.co"
    """Hugging Face hub or mirror (``HF_ENDPOINT``)."""

    hf_token: str | None = field(default=None, repr=False)
    """The agent's own Hugging Face token (``HF_TOKEN``), for pulls that name no credentials
    Secret; never shown (``repr=False``)."""

    s3_endpoint: str | None = None
    """S3-compatible endpoint (``AWS_ENDPOINT_URL``): MinIO, Ceph, SeaweedFS. None: AWS."""

    s3_region: str | None = None
    """S3 region (``AWS_REGION`` / ``AWS_DEFAULT_REGION``)."""

    s3_addressing: str = "auto"
    """``path``, ``virtual`` or ``auto`` (path-style for custom endpoints)."""

    oci_plain_http: tuple[str, ...] = ()
    """OCI registries (``host`` or ``host:port``) reached over plain HTTP, like Docker's
    insecure registries; loopback registries always are. Every other one is HTTPS."""

    model_registry: str | None = None
    """Default Kubeflow Model Registry ``host:port`` for ``model-registry://MODEL/VERSION``."""

    model_registry_scheme: str = "http"
    """Scheme of the model registry's REST API (``http`` or ``https``)."""

    control_retries: int = 6
    """Attempts of a control-plane request (listing, manifest, token) on 429/5xx/resets."""

    @classmethod
    def from_config(cls, src: Mapping[str, Any], environ: Mapping[str, str], *,
                    oci_plain_http: tuple[str, ...] = ()) -> SourceSettings:
        """A setting in the config file (``src``, its ``sources`` section) wins over the
        environment variable that tools of that ecosystem read (HF_ENDPOINT,
        AWS_ENDPOINT_URL, ...), which wins over the default. The agent and the init
        container (environment only) both build their source settings here."""
        return cls(
            hf_endpoint=src.get("hfEndpoint") or environ.get("HF_ENDPOINT") or cls.hf_endpoint,
            hf_token=environ.get("HF_TOKEN") or None,
            s3_endpoint=src.get("s3Endpoint") or environ.get("AWS_ENDPOINT_URL_S3")
            or environ.get("AWS_ENDPOINT_URL"),
            s3_region=src.get("s3Region") or environ.get("AWS_REGION")
            or environ.get("AWS_DEFAULT_REGION"),
            s3_addressing=src.get("s3Addressing", cls.s3_addressing),
            model_registry=src.get("modelRegistry") or environ.get("MODEL_REGISTRY_ADDRESS"),
            model_registry_scheme=src.get("modelRegistryScheme", cls.model_registry_scheme),
            oci_plain_http=oci_plain_http,
        )


@dataclass(frozen=True)
class ArchiveSettings:
    max_members: int = 100_000
    """Members an archive or tar layer may hold."""

    max_bytes: int = 2 * 1024 * GiB
    """Total unpacked bytes one archive may produce."""

    max_ratio: float = 200.0
    """Unpacked bytes per compressed byte above which an archive is a bomb (beyond 1 MiB)."""


@dataclass(frozen=True)
class ApiSettings:
    listen: str = "127.0.0.1:9400"
    """Address of the admin HTTP API (``HOST:PORT``)."""

    token_file: Path | None = None
    """Standalone: a file holding the bearer token required for writes."""

    max_wait: float = 600.0
    """Longest ``?wait=`` a client may ask for, in seconds."""


@dataclass(frozen=True)
class WarmModel:
    uri: str
    """Reference of a model to keep warm."""

    include: tuple[str, ...] = ()
    """Include globs."""

    pin: bool = False
    """Never evict it."""

    verify: str = ""
    """The signature policy it must pass (a ``verifyPolicies`` name), if any."""


@dataclass(frozen=True)
class PolicyFiles:
    """One ``verifyPolicies`` entry of the config file (standalone): a signature policy and
    where its trust material lies. Exactly one method is set."""

    name: str
    """What a pull names (``"verify": NAME``)."""

    public_key: Path | None = None
    """``publicKey``: PEM public key (elliptic curve) of the signer."""

    certificate_chain: Path | None = None
    """``certificateChain``: PEM CA certificates a signing certificate must chain to."""

    sigstore_identity: str = ""
    """``sigstore.identity``: the signer's identity in its Sigstore certificate."""

    sigstore_issuer: str = ""
    """``sigstore.issuer``: the OpenID Connect issuer that vouched for that identity."""

    trust_root: Path | None = None
    """``sigstore.trustRoot``: the Sigstore client trust config (JSON), offline."""

    signature: str = "model.sig"
    """``signature``: the signature file's path in the model."""


@dataclass(frozen=True)
class ClusterSettings:
    audiences: tuple[str, ...] = ("modelcache",)
    """Audiences a caller's projected service-account token must carry (TokenReview)."""

    startup_jitter: float = 30.0
    """Upper bound, in seconds, of the delay before the first pulls after start-up. Each node
    waits a fixed fraction of it derived from its name, so agents spread out."""

    status_interval: float = 30.0
    """Least seconds between two progress writes of a CachedModel's entry in this node's
    NodeCache while its model is pulling (state changes are written at once)."""

    access_ttl: float = 300.0
    """Seconds a successful cross-namespace access check (DESIGN.md) is remembered."""

    token_ttl: float = 60.0
    """Seconds an accepted TokenReview (and an allowed SubjectAccessReview) is remembered."""

    pod_wait: float = 5.0
    """Seconds to wait for a pod that presents a token bound to this node to appear in the
    pod informer (its watch event may lag behind its init container)."""

    retry_base: float = 30.0
    """First delay before a failed CachedModel pull is tried again; doubles each failure, with
    full jitter (``common/backoff.py``)."""

    retry_max: float = 3600.0
    """Longest delay between attempts at a failed CachedModel pull."""

    resync: float = 600.0
    """Seconds between reconciliations of every CachedModel, without any change (a model
    evicted under pressure is pulled again at the next one)."""


@dataclass(frozen=True)
class CsiSettings:
    endpoint: str | None = None
    """``unix:///PATH`` where the CSI node service listens (``--csi-endpoint``); None: the
    agent is not a CSI node plugin."""

    publish_wait: float = 30.0
    """Seconds a NodePublishVolume waits for a model being pulled before it answers
    ``UNAVAILABLE`` with the pull's progress (kubelet asks again, with backoff)."""

    kubelet_dir: Path = Path("/var/lib/kubelet")
    """kubelet's root directory: a target path must be under its ``pods/``."""

    @property
    def socket(self) -> Path | None:
        """The unix socket's path, from the endpoint."""
        return Path(self.endpoint[len("unix://"):]) if self.endpoint else None


@dataclass(frozen=True)
class PageCacheSettings:
    """Page-cache warming (``agent/pagecache``): a model's files read into the node's page
    cache while its pod's image is pulled, so the serving process loads from memory."""

    enabled: bool = True
    """Warm when a pod that uses a model is bound to this node, or its model is ensured."""

    min_available: float = 0.15
    """Fraction of memory (the node's, or the agent's cgroup limit where that is lower) that
    must stay available: warming stops before available memory falls below it."""

    max_share: float = 0.5
    """Most bytes one warming reads, as a fraction of the node's memory."""

    rate_bytes: int = 1 * GiB
    """Bytes per second warming reads at most (0: as fast as the disk goes)."""

    chunk_bytes: int = 16 * MiB
    """Bytes per sequential read."""

    wait_ready: float = 3600.0
    """Seconds a wanted model that is still being pulled is waited for; warmed once ready."""


@dataclass(frozen=True)
class AgentSettings:
    node_name: str = "localhost"
    """The node this agent serves (standalone: the host name)."""

    standalone: bool = True
    """Run without a cluster: policy from the config file, token from a file."""

    refresh_interval: float = 3600.0
    """Seconds after which a mutable reference (branch, tag, URL) is resolved again."""

    shutdown_grace: float = 20.0
    """Seconds to let running pulls checkpoint before they are cancelled on SIGTERM."""

    store: StoreSettings = field(default_factory=StoreSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    warm: tuple[WarmModel, ...] = ()
    """Models to prefetch at start (and pin, if marked)."""

    verify_policies: tuple[PolicyFiles, ...] = ()
    """Signature policies a pull may name (standalone; in a cluster, ConfigMaps)."""

    kube: KubeSettings = field(default_factory=KubeSettings)
    """The Kubernetes API client (cluster mode)."""

    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    """Cluster mode: CachedModels, pods, labels, status, admin API auth."""

    csi: CsiSettings = field(default_factory=CsiSettings)
    """The CSI node service (``--csi-endpoint``)."""
    page_cache: PageCacheSettings = field(default_factory=PageCacheSettings)
    """Page-cache warming of the models pods are about to load."""
