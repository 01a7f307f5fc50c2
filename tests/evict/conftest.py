"""Fixtures for the eviction tests: real small filesystems and agents running on them.

``tmpfs(size_mib)`` mounts a tmpfs of that size (root only; the test is skipped otherwise)
and unmounts it at teardown: a real filesystem whose ENOSPC, statvfs and inode counts are
the kernel's. ``agent_on(store, ...)`` runs a whole agent in the test's event loop (the one harness,
:class:`tests.servers.agent.InProcessAgent`), with its admin API on a loopback port.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.auth import TokenFileAuth
from agent.settings import (
    AgentSettings,
    ApiSettings,
    EgressSettings,
    FetchSettings,
    SourceSettings,
    StoreSettings,
)
from tests.evict.helpers import TOKEN
from tests.servers.agent import InProcessAgent


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(size_mib, inodes=None)``: a fresh tmpfs mount; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size_mib: int, inodes: int | None = None) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        opts = f"size={size_mib}m,mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def agent_on(tmp_path: Path, in_process_agent: Callable[..., Any]) -> Callable[..., Any]:
    """``await agent_on(store_dir, high=..., low=..., quota=..., ...)``: a running agent with
    those store limits (stopped at teardown)."""

    async def start(store: Path, *, high: float = 0.8, low: float = 0.7,
                    quota: int | None = None, min_free_inodes: float = 0.0,
                    interval: float = 3600.0, standalone: bool = True,
                    allow_paths: tuple[Path, ...] = (), max_files: int = 4,
                    refresh_interval: float = 3600.0, hf_endpoint: str = ""
                    ) -> InProcessAgent:
        settings = AgentSettings(
            node_name="evict-test",
            standalone=standalone,
            refresh_interval=refresh_interval,
            store=StoreSettings(path=store, high_watermark=high, low_watermark=low,
                                quota_bytes=quota, min_free_inodes=min_free_inodes,
                                evict_interval=interval),
            egress=EgressSettings(allow_hosts=("127.0.0.1",), allow_paths=allow_paths),
            fetch=FetchSettings(max_files=max_files, retries=2, backoff_base=0.01),
            api=ApiSettings(listen="127.0.0.1:0", token_file=tmp_path / "token"),
            sources=SourceSettings(hf_endpoint=hf_endpoint or SourceSettings.hf_endpoint),
        )
        agent: InProcessAgent = await in_process_agent(settings, auth=TokenFileAuth(TOKEN),
                                                       token=TOKEN)
        return agent

    return start
