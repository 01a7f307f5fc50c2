"""The rules every test keeps (tests/conftest.py), proven on a small test run of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

INNER = textwrap.dedent('''
    import asyncio

    import pytest


    async def test_leaks_a_task():
        asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten")


    async def test_a_task_that_ends_by_itself_soon_is_no_leak():
        asyncio.get_running_loop().create_task(asyncio.sleep(0.05))


    @pytest.fixture
    async def worker():
        task = asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="worker")
        yield task
        task.cancel()


    async def test_a_fixture_that_stops_its_task_is_checked_after_it(worker):
        assert not worker.done()


    def test_a_sync_test_has_no_loop_to_leak_into():
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()
''')


@pytest.mark.slow  # a run of its own, and the leak's grace: ~6 s
def test_an_async_test_that_leaves_a_task_running_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import no_leaked_tasks, pytest_collection_modifyitems  # noqa\n")
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "4 passed, 1 error" in done.stdout, done.stdout + done.stderr
    assert "ERROR test_inner.py::test_leaks_a_task - AssertionError: tasks leaked" in done.stdout
    assert "<Task cancelled name='forgotten'" in done.stdout, "named, and cancelled"
