"""Read-only bind mounts, and the kernel's table of them (``/proc/self/mountinfo``).

The kernel is the truth about what is mounted: after a restart the CSI node learns what it
still serves from the mount table, never from memory. A mount is made with ``mount(2)``
itself (bind, then a remount that adds ``ro,nosuid,nodev``: a bind mount takes its flags
only from a remount) and undone with ``umount2(2)``.

Blocking: system calls; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import StoreError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(StoreError):
    """A mount or an unmount the kernel refused."""

    reason = "mount"


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    device: str
    """``major:minor`` of the filesystem."""
    root: str
    """The directory of that filesystem the mount shows (a bind mount's source, relative
    to the filesystem's own root)."""
    mount_point: str
    options: frozenset[str]
    fs_type: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def unescape(field: str) -> str:
    """A mountinfo field with the kernel's octal escapes (``\\040`` for a space) undone."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``mountinfo`` text (proc(5)); lines that do not parse are skipped."""
    mounts = []
    for line in text.split("\n"):  # not splitlines(): a name may hold \x1e, \x85...
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(
                mount_id=int(fields[0]), device=fields[2], root=unescape(fields[3]),
                mount_point=unescape(fields[4]), options=frozenset(fields[5].split(",")),
                fs_type=fields[sep + 1]))
        except (ValueError, IndexError):
            continue
    return mounts


def mount_table(path: Path = MOUNTINFO) -> list[Mount]:
    return parse_mountinfo(path.read_text())


def mounted_at(target: Path, table: list[Mount]) -> list[Mount]:
    """The mounts whose mount point is ``target``, oldest first (stacked mounts: several)."""
    wanted = os.fspath(target)
    return [m for m in table if m.mount_point == wanted]


def bind_source(mount: Mount, table: list[Mount]) -> Path | None:
    """The path (in this mount namespace) of the directory a bind mount shows, found as
    findmnt does: another mount of the same filesystem whose root contains it."""
    best: Mount | None = None
    for other in table:
        if other.mount_id == mount.mount_id or other.device != mount.device:
            continue
        if not _within(mount.root, other.root):
            continue
        if best is None or len(other.root) > len(best.root):
            best = other
    if best is None:
        return None
    rest = mount.root[len(best.root.rstrip("/")):].lstrip("/")
    return Path(best.mount_point) / rest if rest else Path(best.mount_point)


def _within(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return not root or path == root or path.startswith(root + "/")


def bind_read_only(source: Path, target: Path) -> None:
    """Mount ``source`` at ``target`` (an existing directory), read-only, nosuid, nodev."""
    _mount(source, target, MS_BIND)
    try:
        _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except MountError:
        unmount(target)  # never leave it writable
        raise


def unmount(target: Path) -> bool:
    """Unmount what is mounted at ``target``; False if nothing was."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def _mount(source: Path | None, target: Path, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    if _libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        what = f"{source} at {target}" if source is not None else f"{target} read-only"
        hint = " (the agent needs CAP_SYS_ADMIN: run it privileged)" \
            if err == errno.EPERM else ""
        raise MountError(f"cannot mount {what}: {os.strerror(err)}{hint}")
