"""The serving certificate, reloaded when its files change.

cert-manager and Secret volumes replace the files (a Secret volume swaps a symlink, so the
inode changes); the reloader polls ``(mtime, inode, size)`` of both files and loads the new
chain into the *same* ``ssl.SSLContext`` with ``load_cert_chain``, which applies to every
handshake after it. The pair is first copied to a private directory and loaded into a
scratch context: a half-written pair (new certificate, old key) is refused there, and the
live context, which a failed ``load_cert_chain`` could leave half-changed, is never touched
by it. The old certificate stays in use and the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


class CertReloader:
    """Owns the server's SSL context and keeps its certificate current."""

    def __init__(
        self, cert_file: str, key_file: str, log: logging.Logger,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.log = log
        self.on_reload = on_reload
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._scratch = tempfile.TemporaryDirectory(prefix="modelcache-tls-")
        self._signature = self._stat()
        self.context.load_cert_chain(cert_file, key_file)
        self.loads = 1
        self.failures = 0
        self._checked = asyncio.Event()

    def _stat(self) -> Signature:
        def one(path: str) -> tuple[int, int, int]:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_ino, st.st_size
        return one(self.cert_file), one(self.key_file)

    def check(self) -> bool:
        """Reload if the files changed; True if a new certificate is now in use."""
        try:
            signature = self._stat()
        except OSError:
            return False  # files being replaced: look again next time
        if signature == self._signature:
            return False
        try:
            cert, key = self._copy()
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)  # a dry run
            self.context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            self.log.warning("TLS certificate reload failed; keeping the current one",
                             extra={"fields": {"error": str(e)[:200]}})
            self.failures += 1
            if self.on_reload:
                self.on_reload(False)
            self._notify()
            return False
        self._signature = signature
        self.loads += 1
        self.log.info("TLS certificate reloaded", extra={"fields": {"loads": self.loads}})
        if self.on_reload:
            self.on_reload(True)
        self._notify()
        return True

    def _notify(self) -> None:
        self._checked.set()
        self._checked = asyncio.Event()

    def _copy(self) -> tuple[str, str]:
        """Both files as one consistent snapshot, readable only by this process."""
        directory = Path(self._scratch.name)
        cert, key = directory / "tls.crt", directory / "tls.key"
        for source, target in ((self.cert_file, cert), (self.key_file, key)):
            data = Path(source).read_bytes()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return str(cert), str(key)

    def close(self) -> None:
        self._scratch.cleanup()

    async def wait_for(self, loads: int = 0, failures: int = 0) -> None:
        """Return once at least ``loads`` loads and ``failures`` failed reloads happened."""
        while self.loads < loads or self.failures < failures:
            await self._checked.wait()

    async def run(self, interval: float) -> None:
        """Poll until cancelled (the file checks are a few stat calls: cheap on the loop)."""
        while True:
            await asyncio.sleep(interval)
            self.check()
