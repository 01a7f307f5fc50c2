"""O_DIRECT for partial downloads: aligned chunks go to disk (and are read back for the
hash) without a copy through the page cache, where the file system allows it."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

DIRECT_ALIGN = 4096


def open_direct(path: Path, mode: int = os.O_WRONLY) -> int:
    """``path`` opened O_DIRECT, or -1 where the file system refuses it."""
    try:
        return os.open(path, mode | os.O_DIRECT)
    except OSError:
        return -1


def aligned(offset: int, data: memoryview) -> bool:
    """Whether a write can go O_DIRECT: offset, length and buffer address aligned."""
    if offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not len(data):
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return False  # a read-only or non-contiguous buffer
    return address % DIRECT_ALIGN == 0


__all__ = ["DIRECT_ALIGN", "aligned", "open_direct"]
