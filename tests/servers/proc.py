"""Child processes started by the tests: output to a log file, stopped by PID.

Stop is SIGTERM, then SIGKILL after a grace period (5 s by default), then a wait, so
no server outlives its fixture and no zombie is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.servers.crash import sigkill
from tests.servers.net import wait_until

GRACE_SECONDS = 5.0


def with_hosts(argv: Sequence[str | os.PathLike[str]], hosts_file: Path) -> list[str]:
    """``argv`` run in a private mount namespace that sees ``hosts_file`` as /etc/hosts.

    For names nothing here resolves, such as an S3 bucket's virtual-hosted name: only that
    process (and its children) sees them; the tests and every other server do not. Needs
    root, or unprivileged user namespaces (the caller is then root inside its own).
    """
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    bind = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return [*unshare, "sh", "-c", bind, os.fspath(hosts_file), *map(os.fspath, argv)]


class ManagedProcess:
    """One child process with its output in ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace")

    def wait_ready(self, probe: Callable[[], object], *, what: str, timeout: float,
                   interval: float = 0.02) -> None:
        """Wait until ``probe`` answers truthy. If the process exits or time runs out, stop
        it and raise RuntimeError with the end of its log."""
        try:
            wait_until(probe, timeout=timeout, interval=interval, what=what, alive=self.alive)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"{e}\n{self.log_tail()}") from e

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to checkpoint or clean up (:func:`crash.sigkill`)."""
        assert self.popen is not None, "not started"
        sigkill(self.popen)

    def stop(self, grace: float = GRACE_SECONDS) -> int | None:
        """SIGTERM, SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
