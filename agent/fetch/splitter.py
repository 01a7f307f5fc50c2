"""The splitter: more connections for a file whose streams are slow, while they pay.

A file starts as one stream. A remote CDN or object store caps each connection (Hugging
Face's CDN gives one stream ~40 MB/s), so a slow file's rest is pooled
(:meth:`~agent.store.ingest.Ingest.pool_rest`) and new streams take pieces of it in file
order (:meth:`~agent.store.ingest.Ingest.take_piece`), so that the ordered hash follows
them closely. Fast files are left alone: on a fast link the extra streams would only cost a
second read of their bytes for the ordered hash.

A file's rate is the sum of its streams' rates, each measured between the landings of its
own buffers (:class:`StreamMeter`): bytes become visible a whole buffer at a time, so a rate
taken at the splitter's looks would be off by up to a buffer per stream (a quarter of a
window of four buffers), as much as the margin of the decision it feeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from agent.settings import FetchSettings
from agent.store.ingest import Ingest
from agent.store.segments import Segment

log = logging.getLogger(__name__)

SPLIT_WINDOW_BUFFERS = 4
"""The splitter measures a file's rate over at least this many buffers per stream..."""
SPLIT_WINDOW_LOOKS = 8
"""...or over this many looks, whichever comes first."""

Mark = tuple[int, float]
"""A stream's bytes so far, and when the last of them landed (``time.monotonic``)."""


class StreamMeter:
    """One stream's received bytes, stamped as each buffer lands: written by the stream's
    worker thread (:meth:`landed`), read by the splitter (:attr:`mark`, replaced whole, so a
    reader never sees the count of one landing with the time of another)."""

    __slots__ = ("born", "mark")

    def __init__(self) -> None:
        self.born: Mark = (0, time.monotonic())
        self.mark: Mark = self.born

    def landed(self, n: int) -> None:
        self.mark = (self.mark[0] + n, time.monotonic())


class Streams:
    """The running streams of one file, by their meters."""

    def __init__(self) -> None:
        self._meters: set[StreamMeter] = set()

    def __len__(self) -> int:
        return len(self._meters)

    def add(self) -> StreamMeter:
        meter = StreamMeter()
        self._meters.add(meter)
        return meter

    def remove(self, meter: StreamMeter) -> None:
        self._meters.discard(meter)

    def marks(self) -> dict[StreamMeter, Mark]:
        """Where each stream is now: the start of a measuring window."""
        return {m: m.mark for m in self._meters}

    def received(self, since: dict[StreamMeter, Mark]) -> int:
        """Bytes the running streams received since ``since``."""
        return sum(m.mark[0] - since.get(m, m.born)[0] for m in self._meters)

    def rate(self, since: dict[StreamMeter, Mark]) -> float:
        """Bytes per second of the running streams since ``since``: each stream's bytes
        between its landing before the window and its last one, over the time between
        them (exact for a steady stream, whatever the size of its buffers); a stream that
        landed nothing since adds nothing."""
        total = 0.0
        for m in self._meters:
            (b0, t0), (b1, t1) = since.get(m, m.born), m.mark
            if b1 > b0 and t1 > t0:
                total += (b1 - b0) / (t1 - t0)
        return total


async def split_slow_streams(ingest: Ingest, settings: FetchSettings, streams: Streams,
                             launch: Callable[[Segment], None], wanted: Callable[[], int],
                             on_split: Callable[[int], None]) -> None:
    """Give the file of ``ingest`` more connections (``launch`` starts a stream on a new
    segment) while its ``streams`` are slow; runs until cancelled. ``wanted()``: the
    segments of every file running or waiting for a connection (new streams stay under
    ``max_connections``); ``on_split(n)``: the file has ``n`` streams after a split.

    The streams of a slow file double (up to ``connections_per_file`` and the
    connections free under ``max_connections``) every other look (the look after a
    split lets the new connections ramp up), so a file reaches its full width in a
    second or so. They grow again only while growing pays: if the last split did not
    raise the file's rate by at least half of what the new streams would add at the
    old per-stream rate, the link or the server is the limit, not each connection, and
    more connections would only load an overloaded server further."""
    s = settings
    clock = time.monotonic
    window, began = streams.marks(), clock()
    last_split: tuple[float, int, int] | None = None  # rate before it, streams, added
    settling = False
    while True:
        await asyncio.sleep(s.split_interval)
        active = [seg for seg in ingest.segments if not seg.complete and not seg.pooled]
        if not active:
            continue
        if settling:  # new connections ramp up (TCP slow start): judge them a look later
            window, began, settling = streams.marks(), clock(), False
            continue
        # measure over a window that holds several buffers per stream (or, for a crawl, a
        # few seconds)
        if streams.received(window) < SPLIT_WINDOW_BUFFERS * s.buffer_bytes * len(active) \
                and clock() - began < SPLIT_WINDOW_LOOKS * s.split_interval:
            continue
        rate = streams.rate(window)
        window, began = streams.marks(), clock()
        if rate / len(active) >= s.split_below_rate:
            continue
        if last_split is not None:
            before, streams_before, added = last_split
            if rate <= before * (1 + added / streams_before / 2):
                continue  # the last split did not pay: hold
        room = min(len(active), s.connections_per_file - len(active),
                   s.max_connections - wanted())
        width, added = len(active), 0
        for _ in range(max(room, 0)):
            # the new streams take pieces of the rest of the file in order; the first
            # time, the rest is pooled past one piece of the stream that has most left
            new = ingest.take_piece(s.segment_min_bytes)
            if new is None:
                seg = max(active, key=lambda x: x.remaining or 0)
                if ingest.pool_rest(seg, 2 * s.buffer_bytes + s.segment_min_bytes,
                                    s.segment_min_bytes):
                    new = ingest.take_piece(s.segment_min_bytes)
            if new is None:
                break
            launch(new)
            active.append(new)
            added += 1
        if added:
            last_split, settling = (rate, width, added), True
            on_split(len(active))
            log.debug("splitting a slow download", extra={
                "ref": ingest.ref, "streams": len(active), "added": added,
                "bytes_per_second": int(rate)})


__all__ = ["SPLIT_WINDOW_BUFFERS", "SPLIT_WINDOW_LOOKS", "StreamMeter", "Streams",
           "split_slow_streams"]
