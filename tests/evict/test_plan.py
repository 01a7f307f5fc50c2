"""The victim plan and the shortfall, as pure functions."""

from __future__ import annotations

from collections import Counter

from agent.eviction.limits import Disk, Limits, Shortfall, plan, shortfall
from agent.store.trees import FileEntry

BLOCK = 4096


def files(*specs: tuple[str, int]) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(f"f{i}", size, digest * 64) for i, (digest, size) in enumerate(specs))


def refs_of(*models: tuple[FileEntry, ...], keep: str = "") -> Counter[str]:
    refs: Counter[str] = Counter(f.blake3 for m in models for f in m)
    refs.update(d * 64 for d in keep)
    return refs


def test_least_recently_used_first_until_the_need_is_met() -> None:
    a, b, c = files(("a", 10 * BLOCK)), files(("b", 10 * BLOCK)), files(("c", 10 * BLOCK))
    victims, left, freed = plan([("A", a), ("B", b), ("C", c)], refs_of(a, b, c),
                                Shortfall(watermark=15 * BLOCK), BLOCK)
    assert victims == [("A", "watermark"), ("B", "watermark")]
    assert not left and freed == 20 * BLOCK


def test_a_shared_blob_frees_nothing_until_its_last_model_goes() -> None:
    a = files(("s", 8 * BLOCK), ("a", BLOCK))
    b = files(("s", 8 * BLOCK), ("b", BLOCK))
    pinned = files(("p", BLOCK), ("s", 8 * BLOCK))
    order = [("A", a), ("B", b)]  # the pinned model is not a candidate
    victims, left, freed = plan(order, refs_of(a, b, pinned), Shortfall(quota=5 * BLOCK), BLOCK)
    assert victims == [("A", "quota"), ("B", "quota")]
    assert freed == 2 * BLOCK, "the shared blob stays: the pinned model links it"
    assert left.quota == 3 * BLOCK


def test_blobs_running_pulls_need_are_never_counted_as_freed() -> None:
    a = files(("a", BLOCK), ("k", 4 * BLOCK))
    _, left, freed = plan([("A", a)], refs_of(a, keep="k"), Shortfall(watermark=4 * BLOCK),
                          BLOCK)
    assert freed == BLOCK and left.watermark == 3 * BLOCK


def test_disk_blocks_for_watermarks_bytes_for_the_quota() -> None:
    a = files(("a", 1), ("b", BLOCK + 1), ("e", 0))
    _, left, freed = plan([("A", a)], refs_of(a),
                          Shortfall(watermark=10 * BLOCK, quota=100, inodes=10), BLOCK)
    assert freed == BLOCK + 2
    # 1 + (BLOCK + 1) bytes take 3 blocks; three blobs and a tree directory and manifest
    assert (left.watermark, left.quota, left.inodes) == (7 * BLOCK, 100 - BLOCK - 2, 10 - 5)


def test_shortfall_of_each_limit() -> None:
    disk = Disk(capacity=1000 * BLOCK, used=850 * BLOCK, free=150 * BLOCK, cache=600 * BLOCK,
                inodes=1000, inodes_free=40, block=BLOCK)
    limits = Limits(high=0.8, low=0.7, quota_bytes=650 * BLOCK, min_free_inodes=0.05)
    short = shortfall(limits, disk, 100 * BLOCK, limits.low)
    assert short == Shortfall(watermark=250 * BLOCK, quota=50 * BLOCK, inodes=10, space=0)
    assert short.reason() == "watermark"
    assert shortfall(limits, disk, 0, 1.0, space=200 * BLOCK).reason() == "no_space"
    assert not shortfall(Limits(0.9, 0.8, None, 0.0), disk, 0, 0.9)
