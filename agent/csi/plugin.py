"""The CSI node plugin as the composition root runs it: recover, serve, stop."""

from __future__ import annotations

from collections.abc import Callable

from agent.csi.access import Access, ClusterAccess, StandaloneAccess, TokenReviewer
from agent.csi.node import CsiNode
from agent.csi.server import CsiServer
from agent.csi.service import CsiService
from agent.eviction.usage import Usage
from agent.index import Index
from agent.metrics import Metrics
from agent.pagecache.warmer import PageCacheWarmer
from agent.pull.credentials import CredentialsProvider
from agent.pull.puller import Puller
from agent.settings import AgentSettings
from agent.store.local import Store


class CsiPlugin:
    def __init__(self, node: CsiNode, server: CsiServer) -> None:
        self.node = node
        self.server = server

    @classmethod
    def create(cls, settings: AgentSettings, *, store: Store, index: Index, puller: Puller,
               usage: Usage, credentials: CredentialsProvider, metrics: Metrics,
               ready: Callable[[], bool], reviewer: TokenReviewer | None,
               warmer: PageCacheWarmer | None = None) -> CsiPlugin:
        """``reviewer``: the cluster's TokenReview (None standalone: pods not authenticated)."""
        socket = settings.csi.socket
        assert socket is not None, "no --csi-endpoint"
        access: Access = StandaloneAccess() if reviewer is None else \
            ClusterAccess(reviewer, settings.node_name, settings.cluster.audiences)
        node = CsiNode(settings=settings.csi, store=store, index=index, puller=puller,
                       usage=usage, credentials=credentials, access=access, metrics=metrics,
                       warmer=warmer)
        service = CsiService(node, node_id=settings.node_name, ready=ready, metrics=metrics)
        return cls(node, CsiServer(socket, service))

    async def recover(self) -> None:
        """Before anything may evict: what is still mounted is in use."""
        await self.node.recover()

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
