"""What is resident (mincore, checked against util-linux ``fincore``) and how much memory
the agent may fill (``/proc/meminfo`` and the memory cgroups on its path)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent.pagecache.memory import MemoryProbe, find_limits, meminfo
from agent.pagecache.resident import PAGE, Mapping, resident_bytes

MiB = 1024 * 1024


def fincore(path: Path) -> int:
    """Resident bytes as util-linux's fincore(1) reports them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_resident_bytes_agree_with_fincore(cold: Callable[[str, int], Path]) -> None:
    path = cold("f.bin", 24 * MiB + 123)
    assert resident_bytes(path) == (0, 24 * MiB + 123) and fincore(path) == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly these
        os.pread(fd, 3 * MiB, 8 * MiB)
        assert resident_bytes(path)[0] == fincore(path) == 3 * MiB
        with Mapping(fd, os.fstat(fd).st_size) as m:
            assert m.resident(8 * MiB, 3 * MiB) == 3 * MiB
            assert m.resident(0, 8 * MiB) == 0
            assert m.resident(16 * MiB, 64 * MiB) == 0  # clipped at the end of the file
        os.pread(fd, 200, 24 * MiB)  # the partial last page counts as its bytes
    finally:
        os.close(fd)
    assert resident_bytes(path)[0] == fincore(path) - PAGE + 123


def test_an_empty_file_has_nothing_resident(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert resident_bytes(tmp_path / "empty") == (0, 0)


def test_memory_of_this_machine() -> None:
    info = meminfo(Path("/proc/meminfo"))
    memory = MemoryProbe().read()
    assert 0 < memory.available <= memory.total <= info["MemTotal"]
    assert memory.available <= info["MemAvailable"] + 64 * MiB  # read a moment apart


def cgroup_tree(root: Path, own: str, files: dict[str, dict[str, str]]) -> Path:
    """A cgroup filesystem laid out as the kernel's: ``files`` by cgroup path."""
    for cgroup, values in files.items():
        d = root / cgroup.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            (d / name).write_text(value + "\n")
    proc = root.parent / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "cgroup").write_text(own)
    (proc / "meminfo").write_text(Path("/proc/meminfo").read_text())
    return proc


def test_a_v2_limit_on_the_path_bounds_total_and_available(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = cgroup_tree(root, "0::/kubepods/pod1/agent\n", {
        "/": {"cgroup.controllers": "cpu memory"},
        "/kubepods": {"memory.max": "max", "memory.current": str(900 * MiB)},
        "/kubepods/pod1": {"memory.max": str(2048 * MiB), "memory.current": str(600 * MiB)},
        "/kubepods/pod1/agent": {"memory.max": str(1024 * MiB),
                                 "memory.current": str(900 * MiB)},
    })
    probe = MemoryProbe(proc, root)
    assert len(probe.limits) == 3
    memory = probe.read()
    assert memory.total == 1024 * MiB  # the tightest limit
    assert memory.available == 124 * MiB  # the least headroom: the agent's own
    assert memory.node_total == meminfo(proc / "meminfo")["MemTotal"]


def test_a_v1_container_sees_its_own_cgroup_at_the_mount(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    # the host's path is not under the container's mount: the mount itself is its cgroup
    proc = cgroup_tree(root, "4:memory:/kubepods/burstable/pod1/abc\n0::/\n", {
        "/": {},
        "/memory": {"memory.limit_in_bytes": str(512 * MiB),
                    "memory.usage_in_bytes": str(500 * MiB)},
        "/unified": {"cgroup.procs": ""},
    })
    assert MemoryProbe(proc, root).read().available == 12 * MiB


def test_no_limit_is_the_node_alone(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = cgroup_tree(root, "4:memory:/\n", {
        "/memory": {"memory.limit_in_bytes": "9223372036854771712",
                    "memory.usage_in_bytes": str(100 * MiB)}})
    info = meminfo(proc / "meminfo")
    assert MemoryProbe(proc, root).read().total == info["MemTotal"]
    assert find_limits(tmp_path / "absent", root) == []
