"""The CSI plugin's gRPC server: a unix socket, in the agent's own event loop and process.

The socket's directory is created 0700 when missing and the socket is made 0600 as soon as it
is bound (the umask already keeps others from connecting before that): only root on the node
(kubelet, node-driver-registrar) reaches it. A socket left by an earlier run is replaced; any
other file at that path is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

import grpc

from agent.csi.service import CsiService, handlers
from common.errors import InvalidInput, StoreError

log = logging.getLogger(__name__)


class CsiServer:
    def __init__(self, socket: Path, service: CsiService) -> None:
        self.socket = socket
        self.service = service
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        _prepare(self.socket)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers(self.service))
        try:
            server.add_insecure_port(f"unix://{self.socket}")
        except RuntimeError as e:
            raise StoreError(f"cannot listen on {self.socket}: {e}") from e
        os.chmod(self.socket, 0o600)
        await server.start()
        self._server = server
        log.info("CSI node service listening", extra={"socket": str(self.socket)})

    async def stop(self, grace: float) -> None:
        """Stop taking calls; calls in flight get ``grace`` seconds, then are cancelled."""
        if self._server is None:
            return
        await self._server.stop(grace)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def _prepare(socket: Path) -> None:
    parent = socket.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o700, parents=True)
    try:
        mode = socket.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(f"--csi-endpoint: {socket} exists and is not a socket")
    socket.unlink()  # an earlier run's
