"""The serving certificate, reloaded when its files change.

cert-manager and Secret volumes replace the files (a Secret volume swaps a symlink, so the
inode changes); the reloader polls ``(mtime, inode, size)`` of both files and loads the new
chain into the *same* ``ssl.SSLContext`` with ``load_cert_chain``, which applies to every
handshake after it. The pair is first copied to a private directory and loaded into a
scratch context: a half-written pair (new certificate, old key) is refused there, and the
live context, which a failed ``load_cert_chain`` could leave half-changed, is never touched
by it. The old certificate stays in use and the next poll tries again.

The expiry (``notAfter``) of the certificate in use is known from the first load and after
every successful reload (``not_after``, and ``on_load``), so that it can be exported as a
metric and alerted on before the API server starts refusing the webhook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


class CertReloader:
    """Owns the server's SSL context and keeps its certificate current."""

    def __init__(
        self, cert_file: str, key_file: str, log: logging.Logger,
        on_reload: Callable[[bool], None] | None = None,
        on_load: Callable[[float], None] | None = None,
    ) -> None:
        """Load the pair (``OSError``, ``ssl.SSLError`` or ``ValueError`` if it is not
        usable). ``on_reload(ok)`` follows every reload attempt; ``on_load(not_after)``
        every certificate put in use, the first one included."""
        self.cert_file = cert_file
        self.key_file = key_file
        self.log = log
        self.on_reload = on_reload
        self.on_load = on_load
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._scratch = tempfile.TemporaryDirectory(prefix="modelcache-tls-")
        try:
            self._signature = self._stat()
            cert, key, pem = self._copy()
            self.not_after = not_after(pem)
            self.context.load_cert_chain(cert, key)
        except BaseException:
            self._scratch.cleanup()
            raise
        if on_load:
            on_load(self.not_after)
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
            cert, key, pem = self._copy()
            expiry = not_after(pem)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)  # a dry run
            self.context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.log.warning("TLS certificate reload failed; keeping the current one",
                             extra={"error": str(e)[:200]})
            self.failures += 1
            if self.on_reload:
                self.on_reload(False)
            self._notify()
            return False
        self._signature = signature
        self.not_after = expiry
        self.loads += 1
        self.log.info("TLS certificate reloaded", extra={"loads": self.loads})
        if self.on_reload:
            self.on_reload(True)
        if self.on_load:
            self.on_load(expiry)
        self._notify()
        return True

    def _notify(self) -> None:
        self._checked.set()
        self._checked = asyncio.Event()

    def _copy(self) -> tuple[str, str, bytes]:
        """Both files as one consistent snapshot, readable only by this process; and the
        certificate chain's PEM."""
        directory = Path(self._scratch.name)
        cert, key = directory / "tls.crt", directory / "tls.key"
        cert_pem = Path(self.cert_file).read_bytes()
        key_pem = Path(self.key_file).read_bytes()
        for data, target in ((cert_pem, cert), (key_pem, key)):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return str(cert), str(key), cert_pem

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


def not_after(pem: bytes) -> float:
    """The expiry (Unix time) of the first certificate of a PEM chain: the server's own.

    ``ValueError`` if there is none."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
