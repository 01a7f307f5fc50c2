"""How much memory the agent may fill with page cache: the node's (``/proc/meminfo``) and,
where the agent runs in a memory cgroup, that cgroup's and its ancestors' limits.

Page cache is charged to the cgroup of the process that reads it in: pages the agent warms
count against the agent container's ``memory.max`` (v2; ``memory.limit_in_bytes`` in v1),
and at that limit the kernel reclaims them again. So the memory warming may use is the
lower of the node's and the cgroup's: ``total`` is the smaller of ``MemTotal`` and the
tightest limit, ``available`` the smaller of ``MemAvailable`` and the least headroom
(limit - usage) of a limited cgroup on the agent's path.

Blocking: reads small files under /proc and /sys; call from a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: a v1 memory cgroup without a limit says this (PAGE_COUNTER_MAX pages), or near it
_UNLIMITED_V1 = 1 << 62


@dataclass(frozen=True)
class Memory:
    total: int
    """Bytes of memory the agent's page cache can occupy at most."""
    available: int
    """Bytes of that memory available now."""
    node_total: int
    """The node's memory (``MemTotal``), whatever the cgroup."""


@dataclass(frozen=True)
class Limit:
    """One limited memory cgroup: where its limit and usage are read."""

    limit_file: Path
    usage_file: Path


class MemoryProbe:
    """Reads :class:`Memory` now. ``proc`` and ``cgroup_root`` are where procfs and the
    cgroup filesystem are mounted (``/sys/fs/cgroup``: a v2 tree, or a v1 tree of
    controllers with ``unified/`` beside them)."""

    def __init__(self, proc: Path = Path("/proc"),
                 cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self.meminfo = proc / "meminfo"
        self.limits = find_limits(proc / "self" / "cgroup", cgroup_root)

    def read(self) -> Memory:
        info = meminfo(self.meminfo)
        node = info["MemTotal"]
        total, available = node, info.get("MemAvailable", info["MemFree"])
        for limit in self.limits:
            try:
                cap = _number(limit.limit_file)
                used = _number(limit.usage_file)
            except (OSError, ValueError):
                continue  # the cgroup went away, or says "max": no limit here
            if cap >= total:
                continue
            total = cap
            available = min(available, max(0, cap - used))
        return Memory(total=total, available=min(available, total), node_total=node)


def meminfo(path: Path) -> dict[str, int]:
    """``/proc/meminfo`` in bytes, by field name."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def find_limits(self_cgroup: Path, root: Path) -> list[Limit]:
    """Every memory cgroup from the agent's own up to the root of what it can see (a
    container with its own cgroup namespace sees its own cgroup as ``/``)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    found: list[Limit] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            found += _walk(base, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1: "4:memory:/path"
            found += _walk(root / "memory", path, "memory.limit_in_bytes",
                           "memory.usage_in_bytes")
    return found


def _walk(base: Path, path: str, limit: str, usage: str) -> list[Limit]:
    """The cgroup at ``base/path`` and its ancestors up to ``base``; when ``path`` is not
    under ``base`` (a v1 container that sees the host's path but has its own cgroup
    mounted at ``base``), ``base`` itself."""
    here = base / path.lstrip("/")
    if not (here / limit).is_file():
        here = base
    out = []
    while True:
        if (here / limit).is_file() and (here / usage).is_file():
            out.append(Limit(here / limit, here / usage))
        if here == base or base not in here.parents:
            return out
        here = here.parent


def _number(path: Path) -> int:
    text = path.read_text().strip()
    value = int(text)  # "max" (v2, no limit) raises ValueError
    if value >= _UNLIMITED_V1:
        raise ValueError("no limit")
    return value
