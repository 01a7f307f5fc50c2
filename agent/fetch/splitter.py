"""The splitter: more connections for a file whose streams are slow, while they pay.

A file starts as one stream. A remote CDN or object store caps each connection (Hugging
Face's CDN gives one stream ~40 MB/s), so a slow file's rest is pooled
(:meth:`~agent.store.ingest.Ingest.pool_rest`) and new streams take pieces of it in file
order (:meth:`~agent.store.ingest.Ingest.take_piece`), so that the ordered hash follows
them closely. Fast files are left alone: on a fast link the extra streams would only cost a
second read of their bytes for the ordered hash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.settings import FetchSettings
from agent.store.ingest import Ingest
from agent.store.segments import Segment

log = logging.getLogger(__name__)

SPLIT_WINDOW_BUFFERS = 4
"""The splitter measures a file's rate over at least this many buffers per stream..."""
SPLIT_WINDOW_LOOKS = 8
"""...or over this many looks, whichever comes first."""


async def split_slow_streams(ingest: Ingest, settings: FetchSettings,
                             launch: Callable[[Segment], None],
                             wanted: Callable[[], int]) -> None:
    """Give the file of ``ingest`` more connections (``launch`` starts a stream on a new
    segment) while its streams are slow; runs until cancelled. ``wanted()``: the segments
    of every file running or waiting for a connection (new streams stay under
    ``max_connections``).

    The streams of a slow file double (up to ``connections_per_file`` and the
    connections free under ``max_connections``) every other look (the look after a
    split lets the new connections ramp up), so a file reaches its full width in a
    second or so. They grow again only while growing pays: if the last split did not
    raise the file's rate by at least half of what the new streams would add at the
    old per-stream rate, the link or the server is the limit, not each connection, and
    more connections would only load an overloaded server further."""
    s = settings
    clock = asyncio.get_running_loop().time
    mark_bytes, mark_time = ingest.received_bytes, clock()
    last_split: tuple[float, int, int] | None = None  # rate before it, streams, added
    settling = False
    while True:
        await asyncio.sleep(s.split_interval)
        active = [seg for seg in ingest.segments if not seg.complete and not seg.pooled]
        if not active:
            continue
        if settling:  # new connections ramp up (TCP slow start): judge them a look later
            mark_bytes, mark_time, settling = ingest.received_bytes, clock(), False
            continue
        # bytes become visible a whole buffer at a time: measure over a window long
        # enough to hold several buffers per stream (or, for a crawl, a few seconds)
        got, elapsed = ingest.received_bytes - mark_bytes, clock() - mark_time
        if got < SPLIT_WINDOW_BUFFERS * s.buffer_bytes * len(active) and \
                elapsed < SPLIT_WINDOW_LOOKS * s.split_interval:
            continue
        mark_bytes, mark_time = mark_bytes + got, mark_time + elapsed
        rate = got / elapsed
        if rate / len(active) >= s.split_below_rate:
            continue
        if last_split is not None:
            before, streams, added = last_split
            if rate <= before * (1 + added / streams / 2):
                continue  # the last split did not pay: hold
        room = min(len(active), s.connections_per_file - len(active),
                   s.max_connections - wanted())
        streams, added = len(active), 0
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
            last_split, settling = (rate, streams, added), True
            log.debug("splitting a slow download", extra={
                "ref": ingest.ref, "streams": len(active), "added": added,
                "bytes_per_second": int(rate)})


__all__ = ["SPLIT_WINDOW_BUFFERS", "SPLIT_WINDOW_LOOKS", "split_slow_streams"]
