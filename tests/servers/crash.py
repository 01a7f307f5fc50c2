"""Crashes, for the tests that prove a crash loses nothing: a real SIGKILL of a real process.

A crash is never faked by raising in-process: an exception runs every ``finally`` and
``except`` on its way up (temporary files removed, locks released, state written), which a
killed process never does. The tests kill instead:

- :func:`sigkill`: a process the test started (a real agent, a store writer), at a moment
  the test chose; reaped before it returns.
- :func:`crash_in_child` + :func:`killed_at`: a step run in a child process (forked from
  the test, so it shares the test's objects) that SIGKILLs itself at an exact point of the
  code, before or after a given call: "the process dies right after the manifest is
  written". The kernel drops its locks; nothing of its own cleanup runs.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

#: the exit statuses of a child that did not die as it should
RETURNED, RAISED = 3, 4


def sigkill(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGKILL a child process the test started and reap it (no chance to clean up)."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout)


def killed_at(target: object, name: str, *, after: bool = False) -> None:
    """In the process that calls it: SIGKILL this process when ``target.name`` is called
    (``after``: once the real call has returned). Meant for a :func:`crash_in_child` step;
    nothing restores it, the process does not outlive it."""
    real = getattr(target, name)

    def dying(*args: Any, **kwargs: Any) -> Any:
        if after:
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(target, name, dying)


def crash_in_child(step: Callable[[], object], timeout: float = 30.0) -> None:
    """Run ``step`` in a forked child, which must die of SIGKILL (at a :func:`killed_at`
    point). Waits for its death on a pidfd (no polling); a child that returns, raises or
    outlives ``timeout`` fails the test with what happened."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never back into the test runner
        code = RETURNED
        try:
            step()
        except BaseException:
            traceback.print_exc()
            code = RAISED
        finally:
            os._exit(code)
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"the child {pid} did not reach its crash in {timeout:g} s")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        got = signal.Signals(os.WTERMSIG(status)).name
        assert got == "SIGKILL", f"the child died of {got}, not SIGKILL"
        return
    why = {RETURNED: "the step returned: it never reached its crash point",
           RAISED: "the step raised (traceback above) before its crash point"}
    code = os.waitstatus_to_exitcode(status)
    raise AssertionError(why.get(code, f"the child exited with {code}"))
