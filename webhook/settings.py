"""The webhook's settings: frozen dataclasses grouped by concern, read once, passed down.

``webhook/main.py`` builds these from flags and the environment at start-up; nothing else
reads either.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

DEFAULT_IMAGE = "ghcr.io/modelcache/modelcache:0.1.0"
DEFAULT_NAMESPACE = "modelcache"
AGENT_SERVICE = "modelcache-agent"
AGENT_PORT = 9400
#: environment the injected init container's own download may be given (``--init-env``):
#: where the sources are, never credentials (those come from the pod's credentials Secret)
INIT_ENV_NAMES = ("HF_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                  "AWS_DEFAULT_REGION", "MODEL_REGISTRY_ADDRESS")
#: the init container's variable carrying ``--init-ca-file``'s PEM bundle
INIT_CA_ENV = "MODELCACHE_CA_PEM"


def agent_url_for(namespace: str) -> str:
    """The agent's Service URL in a namespace (the Service has ``internalTrafficPolicy:
    Local``, so the init container always reaches the agent on its own node)."""
    return f"http://{AGENT_SERVICE}.{namespace}.svc:{AGENT_PORT}"


@dataclass(frozen=True)
class PlanSettings:
    """What the pure planner needs to know about the cluster's modelcache installation."""

    csi: bool = False
    """The modelcache CSI driver (``csi.modelcache.io``) is installed on the nodes
    (``--csi``): mode ``csi`` is allowed, and is the default in every namespace."""

    store_path: str = "/var/lib/modelcache"
    """The agent's store root on every node; ``<store>/models/<key>`` is mounted."""

    agent_url: str = agent_url_for(DEFAULT_NAMESPACE)
    """URL the init container uses to reach its own node's agent."""

    image: str = DEFAULT_IMAGE
    """Image of the injected init container (a pinned tag or digest, never ``latest``)."""

    allow_hosts: tuple[str, ...] = ()
    """Hosts (``name``, ``name:port``, ``*.domain``, an IP or a CIDR) a model URI may name
    even though they are loopback, link-local, private or ``localhost``."""

    size_headroom: float = 0.05
    """Extra room given to the fallback emptyDir over the model's declared size."""

    init_env: tuple[tuple[str, str], ...] = ()
    """Environment of the init container (names from :data:`INIT_ENV_NAMES`): the mirrors
    and endpoints its own download uses (the fallback, and every pull in download mode), as
    the agent has them. Without it that download goes to the public endpoints."""

    init_ca_pem: str = ""
    """PEM bundle of CAs the init container's download trusts on top of the image's
    (``--init-ca-file``; a mirror signed by a private CA)."""

    require_verify: tuple[str, ...] = ()
    """Namespaces (names or globs, ``--require-verify``) whose pods must name a signature
    policy (``modelcache.io/verify``); a pod there without one is denied."""

    pod_security_default: str = "privileged"
    """The cluster's default Pod Security ``enforce`` level (``--pod-security-default``, or
    ``defaults.enforce`` of the PodSecurity admission configuration): what a namespace
    without a ``pod-security.kubernetes.io/enforce`` label gets. ``baseline`` and
    ``restricted`` forbid hostPath, so mode cache is not chosen there."""

    pod_security_exempt: tuple[str, ...] = ()
    """Namespaces the PodSecurity admission configuration exempts (``exemptions.namespaces``,
    ``--pod-security-exempt``): whatever their labels say, nothing is enforced there."""

    init_cpu_limit: str = "1"
    """CPU limit of the init container (a ``limits.cpu`` ResourceQuota rejects a pod with a
    container without one); it bounds a fallback download's hashing, not the pod's apps."""


@dataclass(frozen=True)
class ServerSettings:
    """The webhook's HTTPS server."""

    host: str = "0.0.0.0"
    """Address to listen on."""

    port: int = 8443
    """TLS port serving ``/mutate``, ``/healthz``, ``/readyz`` and ``/metrics``."""

    tls_cert: str = ""
    """PEM certificate chain file; reloaded when it changes."""

    tls_key: str = ""
    """PEM private key file; reloaded with the certificate."""

    cert_poll_seconds: float = 5.0
    """How often the certificate files are checked for a change (mtime, inode, size)."""

    max_body_bytes: int = 3 * MiB
    """Largest AdmissionReview accepted; beyond it the answer is 413 (etcd's object limit
    is 1.5 MiB, and a review carries the object once or twice)."""

    namespace: str = DEFAULT_NAMESPACE
    """The webhook's own namespace: its pods are never mutated."""

    shutdown_delay_seconds: float = 2.0
    """After SIGTERM: seconds to keep serving while not ready, so endpoints drop this pod
    before it stops accepting connections."""

    shutdown_timeout_seconds: float = 10.0
    """Seconds in-flight requests may take to finish once the listener is closed."""

    counts_interval: float = 5.0
    """Least seconds between two writes of one CachedModel's counts (``counts.py``)."""

    counts_lease: str = "modelcache-counts"
    """The Lease in ``namespace`` whose holder runs the counts controller."""
