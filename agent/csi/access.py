"""Who a CSI volume is for, and whether that pod may be handed the model.

In a cluster, kubelet passes the pod's name, namespace, uid and service account
(``podInfoOnMount``) and a token of that service account for the audience ``modelcache``
(``tokenRequests``). :meth:`ClusterAccess.authenticate` has the cluster vouch for it:

- the TokenReview must accept the token for one of the agent's audiences;
- its user must be ``system:serviceaccount:<pod namespace>:<pod service account>``;
- where the review names the pod and the node the token is bound to (Kubernetes 1.30 and
  later always do for kubelet's tokens), they must be the pod kubelet named, on this node.

The pod's namespace is then the one whose credentials scope applies (DESIGN.md: a model
fetched with one namespace's credentials is served to another only after the source granted
that namespace's own), enforced by ``Puller.ensure`` as for every other caller.

Standalone (``StandaloneAccess``) nothing is authenticated: only root on the node can reach the
plugin's socket, and there is one tenant.

:func:`admit` is the one place that decides whether this pod may be handed this ready model,
right before the mount. Nothing about a model reaches a pod without passing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.csi.requests import PodInfo
from agent.index import READY, Model
from agent.verify import require_verified
from common.errors import Forbidden, InvalidInput, NotReady, Unauthorized
from common.kube.client import TokenReview

log = logging.getLogger(__name__)
SA_PREFIX = "system:serviceaccount:"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class Pod:
    """The pod a volume is published for, as far as it was verified."""

    namespace: str | None
    """The namespace whose credentials scope applies (None standalone: one tenant)."""
    name: str | None = None
    uid: str | None = None
    authenticated: bool = False

    @property
    def key(self) -> str | None:
        return f"{self.namespace}/{self.name}" if self.namespace and self.name else None


class TokenReviewer(Protocol):
    """What the cluster side offers (``common.kube.client.KubeClient``)."""

    async def token_review(self, token: str, audiences: Iterable[str] = ()) -> TokenReview:
        ...


class Access(Protocol):
    async def authenticate(self, info: PodInfo) -> Pod:
        """The pod the request is for; raise :class:`Unauthorized` or :class:`Forbidden`."""
        ...


class StandaloneAccess:
    """No cluster: the socket is root's only, there is one tenant, nothing to verify."""

    async def authenticate(self, info: PodInfo) -> Pod:
        return Pod(namespace=None, name=info.name, uid=info.uid)


class ClusterAccess:
    def __init__(self, reviewer: TokenReviewer, node: str, audiences: tuple[str, ...]) -> None:
        self.reviewer = reviewer
        self.node = node
        self.audiences = audiences

    async def authenticate(self, info: PodInfo) -> Pod:
        if not (info.namespace and info.name and info.uid and info.service_account):
            raise InvalidInput("the request carries no pod information "
                               "(csi.storage.k8s.io/pod.*): the CSIDriver object must set "
                               "podInfoOnMount: true")
        token = next((info.tokens[a] for a in self.audiences if a in info.tokens), None)
        if token is None:
            raise Unauthorized(f"no service-account token for audience "
                               f"{', '.join(self.audiences)} came with the request: the "
                               "CSIDriver object must request one (tokenRequests)")
        review = await self.reviewer.token_review(token, self.audiences)
        if not review.authenticated:
            log.info("CSI publish refused: token not accepted", extra={"pod": info.key})
            raise Unauthorized(f"the service-account token of pod {info.key} was not "
                               "accepted (TokenReview)")
        expected = f"{SA_PREFIX}{info.namespace}:{info.service_account}"
        if review.user != expected:
            raise Forbidden(f"the token presented for pod {info.key} belongs to "
                            f"{review.user}, not to its service account {expected}")
        for extra, wanted in ((POD_NAME, info.name), (POD_UID, info.uid),
                              (NODE_NAME, self.node)):
            bound = review.extra.get(extra)
            if bound is not None and tuple(bound) != (wanted,):
                raise Forbidden(f"the token presented for pod {info.key} is bound to another "
                                f"{extra.rpartition('/')[2].replace('-', ' ')} "
                                f"({', '.join(bound)})")
        return Pod(info.namespace, info.name, info.uid, authenticated=True)


def admit(pod: Pod, model: Model, policy: str = "") -> None:
    """Decide whether ``pod`` may be handed ``model`` (ready, as ``Puller.ensure`` gave it
    for the pod's namespace and credentials) now: raise if not.

    The one place of that decision for CSI volumes: the credentials scope was applied by the
    puller for this pod's namespace; with the pod's signature policy (``policy``, its scope)
    the manifest must carry a passing check under it (fail closed:
    :func:`agent.verify.require_verified` raises :class:`VerificationFailed`).
    """
    if model.state != READY or model.manifest is None:
        raise NotReady(f"model {model.key} is {model.state}, not ready")
    require_verified(model.manifest, policy)
