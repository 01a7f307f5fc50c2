"""A store writer that runs until it is killed (``test_recovery.py`` SIGKILLs it).

Usage: ``python crash_child.py STORE SEED``. It recovers the store like the agent does at
start-up, then loops forever: resumable ingests (under pull intents, with checkpoints),
sequential blob writes, publishes of new revisions over shared blobs, tree drops, model
removals and blob removals. It prints one line per finished operation.
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

from agent.store.local import Store
from agent.store.recovery import recover
from agent.store.trees import FileEntry, Manifest
from common.errors import Locked

KEYS = ("a" * 24, "b" * 24, "c" * 24)
PATHS = ("config.json", "w/a.bin", "w/b.bin", "x/y/z.bin", "tokenizer.json")


def content(n: int) -> bytes:
    """Content number ``n``: the same bytes in every process, so partials can resume."""
    rng = random.Random(n)
    return rng.randbytes(rng.choice((0, 1, 100, 5000, 70_000, 300_000)))


def ingest(store: Store, rng: random.Random, known: dict[str, int]) -> None:
    n = rng.randrange(12)
    data = content(n)
    sha = hashlib.sha256(data).hexdigest()
    ref = f"sha256-{sha}"
    key = f"pull{n:02d}" + "0" * 18
    store.write_intent(key, {"uri": "hf://org/repo", "refs": [ref], "blobs": list(known)})
    try:
        ing = store.open_ingest(ref, {"url": f"http://127.0.0.1/{n}", "size": len(data),
                                      "sha256": sha})
    except Locked:
        return
    segs = ing.plan(len(data), rng.randint(1, 4), 1000)
    ing.start_hasher()
    for seg in segs:
        while not seg.complete:
            step = rng.randint(1000, 40_000)
            end = min(seg.offset + step, seg.end or 0)
            ing.write(seg, memoryview(data[seg.offset:end]))
            if rng.random() < 0.3:
                ing.checkpoint()
    sealed = ing.commit(store.blobs, len(data), sha)
    store.note_blob(sealed.blake3, sealed.size, sealed.sha256)
    known[sealed.blake3] = sealed.size
    store.remove_intent(key)


def write_blob(store: Store, rng: random.Random, known: dict[str, int]) -> None:
    data = content(100 + rng.randrange(12))
    writer = store.blob_writer()
    for i in range(0, len(data), 8192):
        writer.write(data[i:i + 8192])
    sealed = writer.commit(store.blobs, len(data))
    known[sealed.blake3] = sealed.size


def publish(store: Store, rng: random.Random, known: dict[str, int]) -> None:
    if not known:
        return
    paths = rng.sample(PATHS, rng.randint(1, len(PATHS)))
    files = []
    for path in paths:
        digest = rng.choice(sorted(known))
        if not store.blobs.exists(digest):
            known.pop(digest)
            return
        files.append(FileEntry(path, known[digest], digest))
    key = rng.choice(KEYS)
    store.publish(Manifest(key=key, uri=f"hf://org/{key[:4]}@main", revision=str(rng.random()),
                           tree="", files=tuple(files), created=1.0, last_used=1.0))


def drop(store: Store, rng: random.Random, known: dict[str, int]) -> None:
    key = rng.choice(KEYS)
    manifest = store.manifest(key)
    if manifest is None:
        return
    if manifest.previous and rng.random() < 0.7:
        store.drop_tree(key, rng.choice(manifest.previous))
    else:
        store.remove_model(key)


def collect(store: Store, rng: random.Random, known: dict[str, int]) -> None:
    for digest in store.unreferenced_blobs():
        if rng.random() < 0.5:
            store.remove_blob(digest)
            known.pop(digest, None)


def main() -> None:
    store = Store(Path(sys.argv[1]))
    rng = random.Random(int(sys.argv[2]))
    recover(store)
    known = {b.digest: b.size for b in store.blobs}
    ops = [ingest] * 4 + [write_blob] * 2 + [publish] * 4 + [drop, collect]
    while True:
        op = rng.choice(ops)
        op(store, rng, known)
        print(op.__name__, flush=True)


if __name__ == "__main__":
    main()
