"""File-name checks, applied before any path is built from a name a source gave us.

Every file name that comes from a listing, a manifest or an archive passes through
:func:`safe_relpath`. Absolute paths, ``..``, NUL, backslashes, empty segments, names that
are too long or not UTF-8, and names that are reserved by the store are rejected with
:class:`UnsafeName`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common.errors import UnsafeName
from common.reference import text_problem

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
MAX_DEPTH = 32
#: names a model tree may not use at its top level: the store's own files live there
RESERVED_TOP = frozenset({"manifest.json"})


def safe_relpath(name: str, *, what: str = "file name") -> str:
    """Return ``name`` as a clean relative POSIX path, or raise :class:`UnsafeName`.

    A single leading ``./`` is tolerated (tar members often carry it); everything else
    that could escape the model's directory or confuse a file system is refused.
    """
    if not isinstance(name, str):
        raise UnsafeName(f"{what} is not a string")
    shown = repr(name[:200])
    if not name:
        raise UnsafeName(f"{what} is empty")
    if "\x00" in name:
        raise UnsafeName(f"{what} {shown} contains NUL")
    if (problem := text_problem(name)) is not None:
        raise UnsafeName(f"{what} {shown} {problem}")
    if "\\" in name:
        raise UnsafeName(f"{what} {shown} contains a backslash")
    if name.startswith("/"):
        raise UnsafeName(f"{what} {shown} is an absolute path")
    if name.startswith("./"):
        name = name[2:]
    if len(name.encode()) > MAX_PATH_BYTES:
        raise UnsafeName(f"{what} {shown} is longer than {MAX_PATH_BYTES} bytes")
    segments = name.split("/")
    if len(segments) > MAX_DEPTH:
        raise UnsafeName(f"{what} {shown} is nested deeper than {MAX_DEPTH} directories")
    for seg in segments:
        if seg == "":
            raise UnsafeName(f"{what} {shown} has an empty path segment")
        if seg in (".", ".."):
            raise UnsafeName(f"{what} {shown} contains {seg!r}")
        if len(seg.encode()) > MAX_SEGMENT_BYTES:
            raise UnsafeName(f"{what} {shown} has a segment longer than {MAX_SEGMENT_BYTES} bytes")
    if segments[0] in RESERVED_TOP:
        raise UnsafeName(f"{what} {shown} is reserved by the store")
    return "/".join(segments)


def check_unique(paths: Iterable[str], *, what: str = "file name") -> None:
    """Refuse a path listed twice, and a path that is both a file and a directory."""
    files: set[str] = set()
    for path in paths:
        if path in files:
            raise UnsafeName(f"{what} {path!r} appears twice")
        files.add(path)
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise UnsafeName(f"{what} {parent!r} is both a file and a directory")


def join_inside(root: Path, relpath: str) -> Path:
    """Join a checked relative path to ``root`` and prove the result stays inside it."""
    rel = safe_relpath(relpath)
    target = root.joinpath(*rel.split("/"))
    try:
        target.relative_to(root)
    except ValueError:
        raise UnsafeName(f"file name {relpath!r} leaves its directory") from None
    return target
