"""The local hub is faithful: the real ``huggingface_hub`` client downloads from it.

The client runs in a subprocess so its environment (``HF_ENDPOINT`` read at import,
``HF_HOME``, no Xet, online) is clean and nothing it caches leaks into the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.servers.faulty import Fault
from tests.servers.hfhub import HubServer
from tests.servers.net import fetch

CLIENT = r"""
import json, sys
from huggingface_hub import snapshot_download
out = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    out[name] = snapshot_download(**kwargs)
print(json.dumps(out))
"""


def run_client(
    hub: HubServer, home: Path, downloads: dict[str, dict[str, object]], token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_ENDPOINT=hub.base_url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="10",
        NO_PROXY="*",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(downloads)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tree_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def model_files(n: int = 0) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "test", "rev": %d}' % n,
        "model-00001-of-00002.safetensors": os.urandom(300_000),
        "model-00002-of-00002.safetensors": os.urandom(200_000),
        "tokenizer/vocab.json": b'{"a": 1, "b": 2}',
        "tokenizer/merges.txt": b"a b\n",
    }


def test_snapshot_download_branch_and_commit_via_cdn(
    hf_hub_factory: Callable[..., HubServer], tmp_path: Path
) -> None:
    hub = hf_hub_factory(cdn=True, page_size=2)
    hub.create_repo("org/tiny")
    first = hub.commit("org/tiny", model_files(1))
    second = hub.commit("org/tiny", {"config.json": b'{"rev": 2}', "extra/notes.md": b"hi"})
    assert hub.head("org/tiny", "main").sha == second

    result = run_client(
        hub,
        tmp_path / "home",
        {
            "branch": {"repo_id": "org/tiny", "revision": "main"},
            "commit": {"repo_id": "org/tiny", "revision": first},
            "local": {"repo_id": "org/tiny", "revision": first, "local_dir": str(tmp_path / "d")},
        },
    )
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(paths["branch"]).name == second
    assert tree_of(Path(paths["branch"])) == hub.files("org/tiny", second)
    assert tree_of(Path(paths["commit"])) == hub.files("org/tiny", first)
    assert tree_of(Path(paths["local"])) == hub.files("org/tiny", first)

    tree_calls = hub.log("tree")
    assert len(tree_calls) > 2, "pagination was not exercised"
    cdn = hub.log("cdn")
    assert cdn and all(r.status == 200 for r in cdn if r.method == "GET")
    assert hub.log("info"), "a branch is resolved through /revision/"


@pytest.mark.slow
def test_private_repo_token_not_forwarded_to_cdn(
    hf_hub_factory: Callable[..., HubServer], tmp_path: Path
) -> None:
    hub = hf_hub_factory(cdn=True, tokens={"hf_secret"})
    hub.create_repo("org/private", private=True)
    hub.commit("org/private", model_files())
    hub.fault("tree", Fault(status=429, retry_after=1, headers={"RateLimit": '"api";r=0;t=1'}))

    denied = run_client(hub, tmp_path / "h0", {"x": {"repo_id": "org/private"}})
    assert denied.returncode != 0
    assert "401" in denied.stderr or "RepositoryNotFound" in denied.stderr

    ok = run_client(hub, tmp_path / "h1", {"x": {"repo_id": "org/private"}}, token="hf_secret")
    assert ok.returncode == 0, ok.stderr
    snap = Path(json.loads(ok.stdout.strip().splitlines()[-1])["x"])
    assert tree_of(snap) == hub.files("org/private")

    statuses = [r.status for r in hub.log("tree")]
    assert 429 in statuses and statuses[-1] == 200, "the client retried after the 429"
    assert all(r.authorization == "Bearer hf_secret" for r in hub.log("resolve"))
    cdn = hub.log("cdn")
    assert cdn and all(r.authorization is None for r in cdn)


def test_api_shapes_and_errors(hf_hub: HubServer) -> None:
    hub = hf_hub
    sha = hub.create_repo("org/m")
    hub.commit("org/m", model_files())
    hub.tag("org/m", "v1", "main")

    def get(path: str) -> tuple[int, Mapping[str, str], bytes]:
        r = fetch(hub.base_url + path)
        return r.status, r.headers, r.body

    status, headers, body = get("/api/models/org/m/revision/v1")
    info = json.loads(body)
    assert status == 200 and len(info["sha"]) == 40
    assert {s["rfilename"] for s in info["siblings"]} == set(hub.files("org/m"))

    status, headers, body = get("/api/models/org/m/tree/main?recursive=true")
    page = json.loads(body)
    assert len(page) == 3 and 'rel="next"' in headers["Link"]
    assert page[0]["type"] in ("file", "directory")

    status, headers, _ = get("/api/models/org/m/tree/main/tokenizer")
    assert status == 200

    status, headers, _ = get("/api/models/org/m/revision/nope")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = get("/org/m/resolve/main/missing.bin")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    status, headers, _ = get("/api/models/org/absent")
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = get(f"/org/m/resolve/{sha}/.gitattributes")
    assert status == 200 and headers["X-Repo-Commit"] == sha

    r = fetch(
        hub.base_url + "/org/m/resolve/main/model-00001-of-00002.safetensors",
        headers={"Range": "bytes=10-19"},
    )
    data = hub.files("org/m")["model-00001-of-00002.safetensors"]
    assert r.status == 206 and r.body == data[10:20]
    lfs_sha = r.headers["X-Linked-Etag"].strip('"')
    assert lfs_sha == hashlib.sha256(data).hexdigest()
    assert r.headers["X-Linked-Size"] == str(len(data))


def test_hostile_entries_are_listed_verbatim(hf_hub: HubServer) -> None:
    hub = hf_hub
    hub.create_repo("org/evil")
    names = ["../escape.bin", "/etc/abs.bin", "nul\x00.bin", "dup.bin", "dup.bin"]
    hub.hostile_commit("org/evil", [(n, b"x") for n in names])
    listed: list[str] = []
    url: str | None = hub.base_url + "/api/models/org/evil/tree/main?recursive=true"
    while url:
        r = fetch(url)
        listed += [e["path"] for e in r.json() if e["type"] == "file"]
        link = r.headers.get("Link")
        url = link.split(";")[0].strip("<>") if link else None
    assert sorted(listed) == sorted(names)


@pytest.mark.parametrize("status", [429, 503])
def test_injected_status_carries_retry_after(hf_hub: HubServer, status: int) -> None:
    hf_hub.create_repo("org/r")
    hf_hub.fault("info", Fault(status=status, retry_after=7))
    r = fetch(hf_hub.base_url + "/api/models/org/r/revision/main")
    assert r.status == status and r.headers["Retry-After"] == "7"
    assert fetch(hf_hub.base_url + "/api/models/org/r/revision/main").status == 200
