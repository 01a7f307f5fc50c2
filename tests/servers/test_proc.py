"""ManagedProcess.wait_ready: a server that dies while started is reported with its log;
with_hosts: names that one process alone resolves."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.proc import ManagedProcess, with_hosts


def test_a_process_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('bad config: port 0'); exit(3)"],
                          name="dies", log_dir=tmp_path).start()
    with pytest.raises(RuntimeError, match=r"(?s)the process exited.*bad config: port 0"):
        proc.wait_ready(lambda: False, what="dies ready", timeout=10)
    assert not proc.alive() and proc.stop() == 3


def test_a_process_that_never_answers_is_stopped(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "import time; time.sleep(60)"],
                          name="mute", log_dir=tmp_path).start()
    with pytest.raises(RuntimeError, match="mute ready not reached"):
        proc.wait_ready(lambda: False, what="mute ready", timeout=0.3)
    assert not proc.alive()


def test_ready_returns(tmp_path: Path) -> None:
    with ManagedProcess([sys.executable, "-c", "import time; time.sleep(60)"],
                        name="ok", log_dir=tmp_path) as proc:
        proc.wait_ready(lambda: True, what="ok ready", timeout=5)
        assert proc.alive()


def test_with_hosts_resolves_for_that_process_alone(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("127.0.0.7 bucket.s3.test\n")
    probe = "import socket; print(socket.gethostbyname('bucket.s3.test'))"
    out = subprocess.run(with_hosts([sys.executable, "-c", probe], tmp_path / "hosts"),
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "127.0.0.7"), out.stderr
    with pytest.raises(OSError):
        socket.gethostbyname("bucket.s3.test")
