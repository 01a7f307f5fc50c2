"""End to end: a real ``modelcache agent`` process (no ``--standalone``) against the fake
apiserver enforcing the agent's RBAC from deploy/, pulling from a real nginx with
credentials from a Secret, reporting in its node's NodeCache, logging at debug level,
stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path

import pytest
import yaml

from common.reference import parse, scoped
from tests.cluster.conftest import call, entry, node_labels, reasons
from tests.cluster.test_cluster_auth import init_pod
from tests.cluster.test_cluster_warm import serve_model
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import AGENT_TOKEN
from tests.kubeapi.objects import cached_model, secret, secrets_binding
from tests.kubeapi.server import REPO
from tests.servers.net import free_port
from tests.servers.nginx import ServedDir
from tests.servers.proc import ManagedProcess

STALE = "modelcache.io/m-0123456789abcdef"
TOKEN = "hf_do-not-log-me-7f3a9c"


@pytest.mark.slow
async def test_the_agent_process_in_a_cluster(api: FakeKubeApi, tmp_path: Path,
                                              nginx_dir: ServedDir):
    uri, other = serve_model(nginx_dir), serve_model(nginx_dir, "other.bin")
    ref = scoped(uri, namespace="default", credentials="creds")  # the CachedModel's scope
    c = api.cluster
    c.patch("nodes", "n1", {"metadata": {"labels": {STALE: "ready"}}})  # an earlier run's
    c.create("secrets", secret("creds", token=TOKEN), "default")
    c.create("cachedmodels", cached_model("m", uri, nodeSelector={"pool": "gpu"}, pin=True,
                                          credentialsSecret="creds"), "default")
    kubeconfig = api.write_kubeconfig(tmp_path / "agent.kubeconfig", token=AGENT_TOKEN)
    api.auth.load_rbac([*yaml.safe_load_all((REPO / "deploy/base/rbac-agent.yaml").read_text()),
                        secrets_binding("default")])  # default's admin lets it read "creds"
    api.enforce_rbac = True
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "agent", "agent", "--kubeconfig", kubeconfig,
            "--store", tmp_path / "store", "--listen", f"127.0.0.1:{port}",
            "--allow-host", "127.0.0.1", "--startup-jitter", "0", "--log-level", "debug"]
    env = {**os.environ, "NODE_NAME": "n1", "PYTHONPATH": str(REPO)}
    with ManagedProcess(argv, name="agent", log_dir=tmp_path, env=env, cwd=REPO) as proc:
        try:
            async with asyncio.timeout(30):
                await c.wait_until(lambda: entry(api, "m", "n1").get("state") == "ready"
                                   and node_labels(api, "n1") == {ref.node_label: "ready"})
            # an init container of a pod on this node asks for its own model (cold)
            token = init_pod(api, "web-0", "team-b", other)
            status, model = await call(url, "POST", "/api/v1/models", token, {"uri": other})
            assert status == 202, model
            status, model = await call(url, "GET", f"/api/v1/models/{model['key']}?wait=20",
                                       token)
            assert (status, model["state"], model["in_use"]) == (200, "ready", True)
            status, _ = await call(url, "POST", "/api/v1/models", "forged", {"uri": other})
            assert status == 401
            status, _ = await call(url, "POST", "/api/v1/models", token, {"uri": uri})
            assert status == 403  # not its own model
        finally:
            code = await asyncio.to_thread(proc.stop)
        assert code == 0, proc.log_tail()
    assert api.count("get", "secrets", 200) >= 1, "the agent read the credentials Secret"
    assert [(r.verb, r.resource) for r in api.requests if r.status == 403] == []
    cache = c.get("nodecaches", "n1")
    assert cache["metadata"]["ownerReferences"][0]["uid"] == c.get("nodes", "n1")[
        "metadata"]["uid"]
    assert (entry(api, "m", "n1")["key"], cache["status"]["ready"]) == (ref.key, 1)
    assert [r.query.get("resourceVersion") for r in api.requests if r.verb == "list"] == [
        "0", "0", "0"], "every informer listed from the watch cache"
    # what the agent lists and watches: its own Node and the pods bound to it (by field
    # selector), and the CachedModels (every namespace: a node cannot select them by its
    # labels); no NodeCache (its own is read once, then written), no ConfigMap or Secret
    # (read one by one when a pull names them)
    assert {(r.verb, r.resource, r.query.get("fieldSelector")) for r in api.requests
            if r.verb in ("list", "watch")} == {
        (verb, resource, selector) for verb in ("list", "watch")
        for resource, selector in (("nodes", "metadata.name=n1"),
                                   ("pods", "spec.nodeName=n1"), ("cachedmodels", None))}
    log = proc.log_path.read_text()
    assert '"level": "debug"' in log
    for secret_text in (TOKEN, base64.b64encode(TOKEN.encode()).decode(), token):
        assert secret_text not in log, "a credential reached the log"

    # SIGTERM keeps the labels of what stays on disk; the stale one went at start
    assert node_labels(api, "n1") == {ref.node_label: "ready",
                                      parse(other).node_label: "ready"}
    assert "Pulled" in reasons(api, "m")
