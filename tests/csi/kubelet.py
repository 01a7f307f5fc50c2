"""kubelet's part of a CSI ephemeral inline volume, for real, over the plugin's unix socket.

What kubelet does for a pod's ``csi:`` volume (``pkg/volume/csi``): make the volume's
directory ``<root>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/``, then call
``NodePublishVolume`` with the target ``.../mount`` inside it, a volume id derived from the
pod and the volume, a mount capability with ``SINGLE_NODE_WRITER``, ``readonly`` from the
volume, and a volume context of the volume's attributes plus, as the CSIDriver asks
(``podInfoOnMount``, ``tokenRequests``), the pod's name, namespace, uid, service account and
its tokens; any error is retried with exponential backoff until the call succeeds. When the
pod goes, ``NodeUnpublishVolume``, also retried.

    async with Kubelet(socket, tmp / "var/lib/kubelet") as kubelet:
        published = await kubelet.publish(pod, "model", {"model": uri}, token="...")
        ...
        await kubelet.unpublish(published)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agent.csi.proto import csi_pb2 as pb

DRIVER = "csi.modelcache.io"
AUDIENCE = "modelcache"
RETRY_BASE = 0.05
RETRY_MAX = 1.0


@dataclass(frozen=True)
class Pod:
    name: str = "web-0"
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"


@dataclass(frozen=True)
class Published:
    volume_id: str
    target: Path
    #: (code, message) of every attempt that failed before the one that succeeded
    retries: tuple[tuple[grpc.StatusCode, str], ...]
    seconds: float


class PublishFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Kubelet:
    def __init__(self, socket: Path, root: Path) -> None:
        self.socket = socket
        self.root = root
        self.channel: grpc.aio.Channel | None = None
        #: every UNAVAILABLE answer so far (code, message); ``attempted`` is set at each
        self.attempts: list[tuple[grpc.StatusCode, str]] = []
        self.attempted = asyncio.Event()

    async def __aenter__(self) -> Kubelet:
        self.channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()

    # --- the RPCs --------------------------------------------------------------------------

    async def call(self, service: str, method: str, request: Any, reply: Any) -> Any:
        assert self.channel is not None
        stub = self.channel.unary_unary(
            f"/csi.v1.{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString)
        return await stub(request, timeout=120)

    async def node_call(self, method: str, request: Any) -> Any:
        reply = getattr(pb, method + "Response")
        return await self.call("Node", method, request, reply)

    # --- what kubelet does for a pod ------------------------------------------------------

    def volume_dir(self, pod: Pod, volume: str) -> Path:
        return self.root / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / volume

    def target(self, pod: Pod, volume: str) -> Path:
        return self.volume_dir(pod, volume) / "mount"

    @staticmethod
    def volume_id(pod: Pod, volume: str) -> str:
        """kubelet's handle of an inline volume: ``csi-`` + sha256(pod uid + volume name)."""
        return "csi-" + hashlib.sha256((pod.uid + volume).encode()).hexdigest()

    def publish_request(self, pod: Pod, volume: str, attributes: Mapping[str, str], *,
                        token: str | None = None, readonly: bool = True,
                        pod_info: bool = True) -> pb.NodePublishVolumeRequest:
        context = dict(attributes)
        if pod_info:
            context.update({
                "csi.storage.k8s.io/pod.name": pod.name,
                "csi.storage.k8s.io/pod.namespace": pod.namespace,
                "csi.storage.k8s.io/pod.uid": pod.uid,
                "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
                "csi.storage.k8s.io/ephemeral": "true",
            })
        if token is not None:
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            context["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(
                {AUDIENCE: {"token": token, "expirationTimestamp": expires}})
        mode = pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
        return pb.NodePublishVolumeRequest(
            volume_id=self.volume_id(pod, volume), target_path=str(self.target(pod, volume)),
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(),
                access_mode=pb.VolumeCapability.AccessMode(mode=mode)),
            readonly=readonly, volume_context=context)

    async def publish(self, pod: Pod, volume: str, attributes: Mapping[str, str], *,
                      token: str | None = None, deadline: float = 60.0,
                      request: pb.NodePublishVolumeRequest | None = None) -> Published:
        """Publish as kubelet does: retry ``UNAVAILABLE`` with backoff until it succeeds or
        ``deadline`` seconds pass; any other error is raised (:class:`PublishFailed`)."""
        self.volume_dir(pod, volume).mkdir(parents=True, exist_ok=True)
        req = request or self.publish_request(pod, volume, attributes, token=token)
        started = time.monotonic()
        retries: list[tuple[grpc.StatusCode, str]] = []
        delay = RETRY_BASE
        while True:
            try:
                await self.node_call("NodePublishVolume", req)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise PublishFailed(e.code(), e.details() or "") from None
                retries.append((e.code(), e.details() or ""))
                self.attempts.append(retries[-1])
                self.attempted.set()
                if time.monotonic() - started > deadline:
                    raise PublishFailed(e.code(), e.details() or "") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            return Published(req.volume_id, Path(req.target_path), tuple(retries),
                             time.monotonic() - started)

    async def publish_once(self, request: pb.NodePublishVolumeRequest) -> None:
        """One attempt, as sent: raises :class:`PublishFailed` with the answer's code."""
        try:
            await self.node_call("NodePublishVolume", request)
        except grpc.aio.AioRpcError as e:
            raise PublishFailed(e.code(), e.details() or "") from None

    async def unpublish(self, published: Published) -> None:
        try:
            await self.node_call("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(
                volume_id=published.volume_id, target_path=str(published.target)))
        except grpc.aio.AioRpcError as e:
            raise PublishFailed(e.code(), e.details() or "") from None
