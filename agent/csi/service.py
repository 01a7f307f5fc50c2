"""The CSI Identity and Node services: thin gRPC methods over :class:`CsiNode`.

Each method validates its request (:mod:`agent.csi.requests`), calls the core and maps the
project's errors to gRPC status codes, here and only here (:data:`CODES`): a bad request is
``INVALID_ARGUMENT``, a refusal ``PERMISSION_DENIED``, a model not ready yet ``UNAVAILABLE``
(kubelet retries and shows the message in the pod's events). Nothing is mounted unless the
answer is OK.

The service table (:func:`handlers`) is written out here rather than generated: it names the
RPCs of ``csi.v1`` that this node plugin serves; every other one is unknown to the server and
answered ``UNIMPLEMENTED`` by gRPC itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from agent import __version__
from agent.csi.node import CsiNode
from agent.csi.proto import csi_pb2 as pb
from agent.csi.requests import publish_request, unpublish_request
from agent.metrics import Metrics
from common import errors

log = logging.getLogger(__name__)
DRIVER = "csi.modelcache.io"

#: error class -> (status code, ``outcome`` label of the publish metric); first match wins
CODES: list[tuple[type[errors.ModelcacheError], grpc.StatusCode, str]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (errors.Unauthorized, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (errors.Forbidden, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (errors.VerificationFailed, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (errors.NotAllowed, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE, "pending"),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE, "pending"),
    (errors.SourceError, grpc.StatusCode.UNAVAILABLE, "error"),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, "invalid"),
    (errors.Conflict, grpc.StatusCode.FAILED_PRECONDITION, "invalid"),
    (errors.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED, "error"),
]


def code_of(e: errors.ModelcacheError) -> tuple[grpc.StatusCode, str]:
    for cls, code, outcome in CODES:
        if isinstance(e, cls):
            return code, outcome
    return grpc.StatusCode.INTERNAL, "error"


class CsiService:
    def __init__(self, node: CsiNode, *, node_id: str, ready: Callable[[], bool],
                 metrics: Metrics) -> None:
        self.node = node
        self.node_id = node_id
        self.ready = ready
        self.metrics = metrics

    # --- Identity ------------------------------------------------------------------------

    async def get_plugin_info(self, request: pb.GetPluginInfoRequest,
                              context: grpc.aio.ServicerContext[Any, Any]
                              ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER, vendor_version=__version__)

    async def get_plugin_capabilities(self, request: pb.GetPluginCapabilitiesRequest,
                                      context: grpc.aio.ServicerContext[Any, Any]
                                      ) -> pb.GetPluginCapabilitiesResponse:
        return pb.GetPluginCapabilitiesResponse()  # a node plugin only: no controller

    async def probe(self, request: pb.ProbeRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> pb.ProbeResponse:
        return pb.ProbeResponse(ready=BoolValue(value=self.ready()))

    # --- Node ----------------------------------------------------------------------------

    async def node_get_capabilities(self, request: pb.NodeGetCapabilitiesRequest,
                                    context: grpc.aio.ServicerContext[Any, Any]
                                    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse()  # no staging, stats or expansion

    async def node_get_info(self, request: pb.NodeGetInfoRequest,
                            context: grpc.aio.ServicerContext[Any, Any]
                            ) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.node_id)

    async def node_publish_volume(self, request: pb.NodePublishVolumeRequest,
                                  context: grpc.aio.ServicerContext[Any, Any]
                                  ) -> pb.NodePublishVolumeResponse:
        failure = await self._run("publish", lambda: self.node.publish(
            publish_request(request, self.node.pods_dir)), request.volume_id)
        outcome = failure[2] if failure else "ok"
        self.metrics.csi_publishes.labels(outcome=outcome).inc()
        if failure:
            await context.abort(failure[0], failure[1])
        return pb.NodePublishVolumeResponse()

    async def node_unpublish_volume(self, request: pb.NodeUnpublishVolumeRequest,
                                    context: grpc.aio.ServicerContext[Any, Any]
                                    ) -> pb.NodeUnpublishVolumeResponse:
        failure = await self._run("unpublish", lambda: self.node.unpublish(
            unpublish_request(request, self.node.pods_dir)), request.volume_id)
        if failure:
            await context.abort(failure[0], failure[1])
        return pb.NodeUnpublishVolumeResponse()

    async def _run(self, what: str, call: Callable[[], Awaitable[None]], volume_id: str
                   ) -> tuple[grpc.StatusCode, str, str] | None:
        """Run ``call``; None if it succeeded, else (code, message, outcome)."""
        try:
            await call()
        except errors.ModelcacheError as e:
            code, outcome = code_of(e)
            log.log(logging.DEBUG if outcome == "pending" else logging.INFO,
                    f"CSI {what} not done", extra={"volume": volume_id[:128],
                                                   "code": code.name, "error": str(e)})
            return code, str(e), outcome
        except Exception:
            log.exception(f"CSI {what} crashed", extra={"volume": volume_id[:128]})
            return grpc.StatusCode.INTERNAL, "internal error (see the agent's log)", "error"
        return None


def handlers(service: CsiService) -> tuple[grpc.GenericRpcHandler, ...]:
    """The gRPC service table: ``csi.v1.Identity`` and ``csi.v1.Node``."""
    identity = {
        "GetPluginInfo": _unary(service.get_plugin_info, pb.GetPluginInfoRequest),
        "GetPluginCapabilities": _unary(service.get_plugin_capabilities,
                                        pb.GetPluginCapabilitiesRequest),
        "Probe": _unary(service.probe, pb.ProbeRequest),
    }
    node = {
        "NodePublishVolume": _unary(service.node_publish_volume, pb.NodePublishVolumeRequest),
        "NodeUnpublishVolume": _unary(service.node_unpublish_volume,
                                      pb.NodeUnpublishVolumeRequest),
        "NodeGetCapabilities": _unary(service.node_get_capabilities,
                                      pb.NodeGetCapabilitiesRequest),
        "NodeGetInfo": _unary(service.node_get_info, pb.NodeGetInfoRequest),
    }
    return (grpc.method_handlers_generic_handler("csi.v1.Identity", identity),
            grpc.method_handlers_generic_handler("csi.v1.Node", node))


def _unary(method: Callable[[Any, Any], Awaitable[Any]], request: Any
           ) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request.FromString,
        response_serializer=lambda response: response.SerializeToString())
