"""Who may call the admin API in a cluster: TokenReview for who, SubjectAccessReview for what.

Every call but the probes and ``/metrics`` needs a bearer token: a projected service-account
token with the agent's audience (default ``modelcache``), checked with a TokenReview
(refused or absent: 401). Then:

- a token bound to a pod (TokenReview ``extra`` names it, as kubelet's projected tokens do)
  that is pending or running on **this** node, with the same uid and service account, may
  read the model list and ensure **its own** model: the one its ``modelcache.io/model`` /
  ``modelcache.io/include`` (or ``modelcache.io/injected``) annotations name, with no
  credentials or the Secret its ``modelcache.io/credentials`` annotation names, unpinned.
  That is what an injected init container does; its pod needs no RBAC for it.
- anything else is asked of the cluster's authorizers (SubjectAccessReview), mapped onto the
  CachedModel resource whose power it matches:

  ===========================  =====================================================
  request                      allowed if the caller may
  ===========================  =====================================================
  ``POST /api/v1/models``      ``create cachedmodels.modelcache.io`` in its own
                               namespace (its credentials are read there; creating a
                               CachedModel there would make every agent pull the same)
  reads (models, store)        ``list cachedmodels.modelcache.io`` in all namespaces
  ``DELETE``, ``POST /gc``     ``delete cachedmodels.modelcache.io/cache`` in all
                               namespaces (a virtual subresource: evicting from node
                               caches, even a model in use with ``?force``, is a power
                               apart from deleting CachedModel objects)
  ``GET /api/v1/blobs/...``    ``get cachedmodels.modelcache.io/blobs`` (virtual too)
                               in all namespaces
  ===========================  =====================================================

  Refused: 403. Accepted reviews are remembered for ``token_ttl`` seconds (keyed by a hash
  of the token, never the token itself).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web

from agent.auth import Caller, bearer
from agent.cluster.pods import credentials_of, models_of, running
from agent.settings import ClusterSettings
from common.errors import Forbidden, Unauthorized
from common.kube.client import GROUP, PLURAL, KubeClient, TokenReview
from common.reference import Reference

log = logging.getLogger(__name__)
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
SA_PREFIX = "system:serviceaccount:"
MAX_REMEMBERED = 4096
Obj = dict[str, Any]
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Access:
    """SubjectAccessReview attributes of one kind of request."""

    verb: str
    subresource: str = ""
    namespaced: bool = False


#: what a caller that is not one of this node's pods needs, by action (see the module doc)
ACCESS = {
    "ensure": Access("create", namespaced=True),
    "read": Access("list"),
    "write": Access("delete", subresource="cache"),
    "peer": Access("get", subresource="blobs"),
}


class PodLookup(Protocol):
    """What the authenticator needs of the pod directory (``agent.cluster.pods.PodDirectory``)."""

    def get(self, key: str) -> Obj | None:
        ...

    async def find(self, key: str, uid: str, wait: float) -> Obj | None:
        ...


class KubeAuth:
    def __init__(self, kube: KubeClient, pods: PodLookup, node: str, settings: ClusterSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.pods = pods
        self.node = node
        self.settings = settings
        self._clock = clock
        self._tokens: dict[str, tuple[float, TokenReview]] = {}
        self._grants: dict[tuple[str, ...], float] = {}
        #: TokenReviews and SubjectAccessReviews sent (for tests and metrics)
        self.reviews = 0

    # --- the Authenticator protocol ------------------------------------------------------

    async def authenticate(self, request: web.Request, action: str) -> Caller:
        access = ACCESS.get(action)
        if access is None:
            raise Forbidden(f"unknown action {action!r}")
        caller = await self._identify(request)
        if action == "ensure" or (action == "read" and caller.pod is not None):
            return caller  # ensure: ``admit`` decides once the model is known
        await self._require(caller, access)
        return caller

    async def admit(self, caller: Caller, ref: Reference, credentials: str | None,
                    pin: bool) -> None:
        pod = self.pods.get(caller.pod) if caller.pod else None
        if pod is not None and running(pod) and not pin and ref.key in models_of(pod) \
                and credentials in (None, credentials_of(pod)):
            return
        try:
            await self._require(caller, ACCESS["ensure"])
        except Forbidden as e:
            if pod is None:
                raise
            raise Forbidden(f"{e}; as pod {caller.pod} it may only ask, unpinned, for the "
                            "model its annotations name, with the credentials they name") from e

    # --- who -----------------------------------------------------------------------------

    async def _identify(self, request: web.Request) -> Caller:
        token = bearer(request)
        if token is None:
            raise Unauthorized("this request needs a bearer token: a service-account token "
                               f"for audience {', '.join(self.settings.audiences)}")
        review = await self._review(token)
        if not review.authenticated:
            raise Unauthorized("the bearer token was not accepted (TokenReview for audience "
                               f"{', '.join(self.settings.audiences)})")
        namespace = None
        if review.user.startswith(SA_PREFIX):
            namespace = review.user[len(SA_PREFIX):].partition(":")[0] or None
        pod = await self._pod_of(review, namespace)
        return Caller(review.user, namespace, review.groups, pod=pod)

    async def _review(self, token: str) -> TokenReview:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        remembered = self._tokens.get(digest)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        self.reviews += 1
        review = await self.kube.token_review(token, self.settings.audiences)
        if review.authenticated:
            _remember(self._tokens, digest, (now + self.settings.token_ttl, review))
        return review

    async def _pod_of(self, review: TokenReview, namespace: str | None) -> str | None:
        """``namespace/name`` of the pod of this node the token is bound to, if any."""
        names, uids = review.extra.get(POD_NAME, ()), review.extra.get(POD_UID, ())
        nodes = review.extra.get(NODE_NAME, ())
        if not (namespace and len(names) == 1 and len(uids) == 1):
            return None
        if nodes and tuple(nodes) != (self.node,):
            return None  # a pod of another node
        key = f"{namespace}/{names[0]}"
        pod = await self.pods.find(key, uids[0], self.settings.pod_wait)
        if pod is None or not running(pod):
            return None
        spec = pod.get("spec") or {}
        account = spec.get("serviceAccountName") or "default"
        if spec.get("nodeName") != self.node or review.user != f"{SA_PREFIX}{namespace}:{account}":
            return None
        return key

    # --- what ----------------------------------------------------------------------------

    async def _require(self, caller: Caller, access: Access) -> None:
        namespace = (caller.namespace or "") if access.namespaced else ""
        memo = (caller.name, ",".join(sorted(caller.groups)), access.verb, access.subresource,
                namespace)
        now = self._clock()
        if self._grants.get(memo, 0.0) > now:
            return
        self.reviews += 1
        allowed = await self.kube.subject_access_review(
            caller.name, caller.groups, access.verb, PLURAL, namespace, group=GROUP,
            subresource=access.subresource)
        if not allowed:
            resource = f"{PLURAL}/{access.subresource}" if access.subresource else PLURAL
            where = f"in namespace {namespace}" if namespace else "in all namespaces"
            log.info("admin API request refused", extra={
                "user": caller.name, "verb": access.verb, "resource": resource,
                "namespace": namespace})
            raise Forbidden(f"{caller.name} may not {access.verb} {resource}.{GROUP} {where}, "
                            "which this request needs")
        _remember(self._grants, memo, now + self.settings.token_ttl)


def _remember(memo: dict[K, V], key: K, value: V) -> None:
    """Add to a bounded memo (cleared when full: entries are cheap to get again)."""
    if len(memo) >= MAX_REMEMBERED:
        memo.clear()
    memo[key] = value
