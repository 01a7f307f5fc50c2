"""The crash helpers kill for real: the step dies of SIGKILL exactly where it was told, its
cleanup never runs, and a step that does not die fails the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.crash import crash_in_child, killed_at, sigkill


class Writer:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def run(self, first: bytes, second: bytes) -> None:
        try:
            self.write(first)
            self.write(second)
        finally:
            self.path.with_suffix(".cleanup").write_text("ran")  # a crash never gets here


@pytest.mark.parametrize(("after", "left"), [(False, None), (True, b"first")])
def test_the_child_dies_at_the_call_before_or_after_it(tmp_path: Path, after: bool,
                                                       left: bytes | None) -> None:
    writer = Writer(tmp_path / "out.bin")

    def step() -> None:
        killed_at(Writer, "write", after=after)
        writer.run(b"first", b"second")

    crash_in_child(step)
    assert (writer.path.read_bytes() if writer.path.exists() else None) == left
    assert not writer.path.with_suffix(".cleanup").exists(), "no finally ran"
    writer.run(b"first", b"second")  # the test's own process is untouched
    assert writer.path.read_bytes() == b"second"


def test_a_step_that_does_not_die_fails_the_test(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="never reached its crash point"):
        crash_in_child(lambda: None)
    with pytest.raises(AssertionError, match=r"raised .* before its crash point"):
        crash_in_child(lambda: 1 / 0)  # type: ignore[func-returns-value]
    with pytest.raises(AssertionError, match=r"did not reach its crash in 0\.2 s"):
        crash_in_child(lambda: __import__("time").sleep(60), timeout=0.2)


def test_sigkill_reaps_a_running_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sigkill(child)
    assert child.returncode == -9
