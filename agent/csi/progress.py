"""What kubelet is told while a pod waits for its model: the text of an ``UNAVAILABLE``.

kubelet shows it in the pod's events (``MountVolume.SetUp failed ... desc = <this>``), so it
says how far the pull is and how fast it goes: ``model 3f2a... (hf://org/name): pulling 42%
of 14.2 GiB, 310 MB/s``.
"""

from __future__ import annotations

import time

from agent.index import FAILED, Model

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL = ("B/s", "kB/s", "MB/s", "GB/s", "TB/s")


def size_text(n: float) -> str:
    """A size in binary units, three significant digits (``14.2 GiB``, ``512 B``)."""
    unit = 0
    while n >= 1024 and unit < len(_BINARY) - 1:
        n /= 1024
        unit += 1
    return f"{n:.0f} {_BINARY[unit]}" if unit == 0 or n >= 100 else f"{n:.1f} {_BINARY[unit]}"


def rate_text(bytes_per_second: float) -> str:
    """A transfer rate in decimal units, as network speeds are quoted (``310 MB/s``)."""
    unit = 0
    while bytes_per_second >= 1000 and unit < len(_DECIMAL) - 1:
        bytes_per_second /= 1000
        unit += 1
    return f"{bytes_per_second:.0f} {_DECIMAL[unit]}" if bytes_per_second >= 10 \
        else f"{bytes_per_second:.1f} {_DECIMAL[unit]}"


class Watch:
    """The bytes of a pull, seen at the start and the end of one wait."""

    def __init__(self, model: Model) -> None:
        self.done = model.bytes_done
        self.since = time.monotonic()

    def rate(self, model: Model) -> float:
        """Bytes per second during the wait, else since the pull began."""
        elapsed = time.monotonic() - self.since
        if elapsed >= 0.5 and model.bytes_done >= self.done:
            return (model.bytes_done - self.done) / elapsed
        started = max(time.time() - model.started, 1e-3)
        return model.bytes_done / started


def not_ready_message(model: Model, rate: float) -> str:
    what = f"model {model.key} ({model.ref.display})"
    if model.state == FAILED:
        return (f"{what}: the pull failed: {model.error or 'unknown error'}; it starts again "
                "at the next attempt")
    if model.bytes_total <= 0:
        return f"{what}: pulling: resolving the revision and listing files"
    percent = min(100, int(100 * model.bytes_done / model.bytes_total))
    return (f"{what}: pulling {percent}% of {size_text(model.bytes_total)}, "
            f"{rate_text(rate)}")
