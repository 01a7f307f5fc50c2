"""Which pages of a file are in the page cache: ``mincore(2)`` over a read-only shared
mapping of it (what ``fincore`` and ``vmtouch`` do). Mapping a file reads nothing and
faults nothing in; the mapping is dropped again before returning.

Python's ``mmap`` module exposes no address for a read-only mapping, so libc's ``mmap``,
``mincore`` and ``munmap`` are called through ctypes (which releases the GIL around each).

Blocking: call from a thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
#: mincore sets bit 0 of each byte for a resident page; the other bits are reserved
_RESIDENT_BIT = bytes(b & 1 for b in range(256))


class Mapping:
    """A file mapped read-only to ask about its pages; ``with Mapping(fd, size) as m``."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.address: int | None = None
        if size > 0:
            address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address == _MAP_FAILED or address is None:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap: {os.strerror(err)}")
            self.address = address

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.address is not None:
            _libc.munmap(self.address, self.size)
            self.address = None

    def resident(self, offset: int, length: int) -> int:
        """Bytes of ``[offset, offset + length)`` whose pages are in the page cache
        (``offset`` a multiple of the page size)."""
        if self.address is None or length <= 0:
            return 0
        assert offset % PAGE == 0, "offset must be page aligned"
        length = min(length, self.size - offset)
        pages = (length + PAGE - 1) // PAGE
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(self.address + offset, length, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        bits = vec.raw[:pages].translate(_RESIDENT_BIT)
        present = (pages - bits.count(0)) * PAGE
        if bits[-1] and length % PAGE:  # a resident last page counts for what it holds
            present -= PAGE - length % PAGE
        return present


def resident_bytes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(bytes of the file in the page cache, its size)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with Mapping(fd, size) as m:
            return m.resident(0, size), size
    finally:
        os.close(fd)
