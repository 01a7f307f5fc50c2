"""Segment planning: how a partial download's bytes are divided among its streams.

A file is a list of :class:`Segment` in file order, each fetched by one connection at a
time. It starts as one segment (or as many as :func:`plan` makes); for more streams the rest
of a segment is pooled (:func:`pool_rest`) and streams take pieces of the pool in file
order (:func:`take_piece`), so the ordered hash follows them closely. Boundaries fall on
:data:`SEGMENT_ALIGN` so full chunks can be written O_DIRECT.

Pure functions over the list; the ingest that owns it calls them under its lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

SEGMENT_ALIGN = 1024 * 1024


@dataclass
class Segment:
    """A byte range of the file, fetched by one connection at a time."""

    start: int
    end: int | None
    """Exclusive end; ``None`` while the size is unknown (a single streamed segment)."""
    done: int = 0
    """Bytes written from ``start``."""
    pooled: bool = False
    """No stream has it yet: streams take pieces from its front, in file order (the state
    keeps it as an ordinary segment, so a resume fetches it)."""

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done >= self.end

    @property
    def offset(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int | None:
        return None if self.end is None else self.end - self.offset


def plan(size: int | None, parts: int, min_part: int) -> list[Segment]:
    """A new division of a file of ``size`` bytes (``None``: unknown, one streamed segment)
    into at most ``parts`` segments of at least ``min_part`` bytes, on aligned boundaries."""
    if size is None:
        return [Segment(0, None)]
    n = max(1, min(parts, size // max(min_part, 1), size // SEGMENT_ALIGN))
    # boundaries on SEGMENT_ALIGN, so that full chunks can be written O_DIRECT
    bounds = sorted({0, size, *(i * size // n // SEGMENT_ALIGN * SEGMENT_ALIGN
                                for i in range(1, n))})
    return [Segment(a, b) for a, b in itertools.pairwise(bounds)] or [Segment(0, 0)]


def pool_rest(segments: list[Segment], seg: Segment, keep: int, min_part: int) -> bool:
    """Leave ``seg`` the next ``keep`` bytes (rounded up to :data:`SEGMENT_ALIGN`) and
    pool the rest of it, for streams to take in pieces (:func:`take_piece`). False if
    there is a pool already or too little is left."""
    if seg.end is None or seg not in segments or any(s.pooled for s in segments):
        return False
    cut = -(-(seg.offset + keep) // SEGMENT_ALIGN) * SEGMENT_ALIGN
    if seg.end - cut < min_part:
        return False
    pool = Segment(cut, seg.end, pooled=True)
    seg.end = cut
    segments.insert(segments.index(seg) + 1, pool)
    return True


def take_piece(segments: list[Segment], size: int) -> Segment | None:
    """The next piece of the pool, for a stream to fetch: ``size`` bytes, less near
    the end (so the streams finish together rather than wait on one last big piece),
    all of it if less than two pieces are left; None if there is no pool or it is
    empty. Pieces go in file order, so the ordered hash follows the streams closely."""
    pool = next((s for s in segments if s.pooled), None)
    if pool is None or pool.end is None:
        return None
    streams = 1 + sum(1 for s in segments if not s.pooled and not s.complete)
    size = min(size, (pool.end - pool.start) // (2 * streams))
    size = max(SEGMENT_ALIGN, size // SEGMENT_ALIGN * SEGMENT_ALIGN)
    if pool.end - pool.start < 2 * size:
        pool.pooled = False
        return pool
    piece = Segment(pool.start, pool.start + size)
    pool.start += size
    segments.insert(segments.index(pool), piece)
    return piece


def compact(segments: Sequence[Segment]) -> list[Segment]:
    """Adjacent complete segments merged into one: a file fetched in pieces would
    otherwise keep one per piece, walked by every ordered-hash step and written into
    every checkpoint. (Their streams are done with them.)"""
    out: list[Segment] = []
    for seg in segments:
        prev = out[-1] if out else None
        if prev is not None and prev.complete and seg.complete and prev.end == seg.start:
            out[-1] = Segment(prev.start, seg.end, prev.done + seg.done)
        else:
            out.append(seg)
    return out


def contiguous(segments: Sequence[Segment]) -> int:
    """Bytes written from the start of the file without a gap (what can be hashed)."""
    total = 0
    for s in segments:
        total = s.start + s.done
        if not s.complete:
            break
    return total


def finished(segments: Sequence[Segment]) -> bool:
    """Whether every byte of a file of known size is written."""
    return all(s.complete for s in segments) and segments[-1].end is not None


__all__ = ["SEGMENT_ALIGN", "Segment", "compact", "contiguous", "finished", "plan",
           "pool_rest", "take_piece"]
