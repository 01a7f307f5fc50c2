"""The reads of one warming on a real disk: everything ends up resident; resident chunks are
not read again; the memory floor, the budget, the rate and the stop flag hold."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.pagecache.memory import MemoryProbe
from agent.pagecache.reader import BUDGET, MEMORY, STOPPED, Limits, Reader
from agent.pagecache.resident import resident_bytes

MiB = 1024 * 1024
#: the kernel reads ahead of the last read (read_ahead_kb, doubled for sequential files):
#: a warming that stops may have had that much more brought in behind it
READAHEAD = 16 * MiB
UNBOUNDED = Limits(floor_bytes=0, budget_bytes=1 << 50, rate_bytes=0, chunk_bytes=4 * MiB)


def reader(limits: Limits = UNBOUNDED, stop: threading.Event | None = None) -> Reader:
    return Reader(limits, MemoryProbe(), stop or threading.Event())


def test_reads_every_file_into_the_page_cache(cold: Callable[[str, int], Path]) -> None:
    files = [cold("a.safetensors", 9 * MiB + 5), cold("b.safetensors", 3 * MiB)]
    seen: list[int] = []
    r = Reader(UNBOUNDED, MemoryProbe(), threading.Event(), on_warmed=seen.append)
    result = r.run(files)
    assert result.stopped is None
    assert result.warmed_bytes == sum(seen) == 12 * MiB + 5
    for f in files:
        resident, size = resident_bytes(f)
        assert resident == size


def test_chunks_already_resident_are_not_read(cold: Callable[[str, int], Path]) -> None:
    hot, part = cold("hot.bin", 8 * MiB), cold("part.bin", 8 * MiB)
    hot.read_bytes()
    with part.open("rb") as f:  # the first chunk of it only
        f.read(4 * MiB)
    result = reader().run([hot, part])
    assert result.resident_bytes >= 8 * MiB + 4 * MiB
    assert result.warmed_bytes <= 4 * MiB
    assert resident_bytes(part) == (8 * MiB, 8 * MiB)


def test_stops_at_the_memory_floor(cold: Callable[[str, int], Path]) -> None:
    big = cold("big.bin", 128 * MiB)
    available = MemoryProbe().read().available
    # a floor 20 MiB under what is available now: what the warming reads counts against it
    limits = Limits(floor_bytes=available - 20 * MiB, budget_bytes=1 << 50, rate_bytes=0,
                    chunk_bytes=4 * MiB)
    result = reader(limits).run([big])
    assert result.stopped == MEMORY
    # near the floor the kernel reads no further ahead than asked; 8 MiB for what other
    # processes on the machine free or take between the two readings
    assert 0 < result.warmed_bytes <= 20 * MiB + 8 * MiB
    assert resident_bytes(big)[0] < 128 * MiB


def test_nothing_is_read_below_the_floor(cold: Callable[[str, int], Path]) -> None:
    f = cold("f.bin", 4 * MiB)
    limits = Limits(floor_bytes=MemoryProbe().read().total, budget_bytes=1 << 50,
                    rate_bytes=0, chunk_bytes=4 * MiB)
    result = reader(limits).run([f])
    assert (result.stopped, result.warmed_bytes) == (MEMORY, 0)
    assert resident_bytes(f)[0] == 0


def test_stops_at_the_budget(cold: Callable[[str, int], Path]) -> None:
    files = [cold("a.bin", 8 * MiB), cold("b.bin", 8 * MiB)]
    limits = Limits(floor_bytes=0, budget_bytes=10 * MiB, rate_bytes=0, chunk_bytes=4 * MiB)
    result = reader(limits).run(files)
    assert (result.stopped, result.warmed_bytes) == (BUDGET, 8 * MiB)
    assert resident_bytes(files[1])[0] == 0


def test_the_rate_is_bounded(cold: Callable[[str, int], Path]) -> None:
    f = cold("f.bin", 24 * MiB)
    limits = Limits(floor_bytes=0, budget_bytes=1 << 50, rate_bytes=32 * MiB,
                    chunk_bytes=4 * MiB)
    started = time.monotonic()
    result = reader(limits).run([f])
    elapsed = time.monotonic() - started
    assert result.warmed_bytes == 24 * MiB
    assert elapsed >= 24 / 32 * 0.95  # 0.75 s at 32 MiB/s (its last sleep included)


def test_the_stop_flag_ends_it_within_a_chunk(cold: Callable[[str, int], Path]) -> None:
    f = cold("f.bin", 64 * MiB)
    stop = threading.Event()
    limits = Limits(floor_bytes=0, budget_bytes=1 << 50, rate_bytes=8 * MiB,
                    chunk_bytes=4 * MiB)
    r = Reader(limits, MemoryProbe(), stop, on_warmed=lambda n: stop.set())
    started = time.monotonic()
    result = r.run([f])
    assert result.stopped == STOPPED
    assert result.warmed_bytes <= 4 * MiB + READAHEAD
    assert resident_bytes(f)[0] < 64 * MiB
    assert time.monotonic() - started < 1.5  # the pacing sleep is cut short too
