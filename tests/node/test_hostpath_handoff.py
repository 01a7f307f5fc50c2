"""Cache mode on a real node's terms: kubelet's hostPath, the agent as the DaemonSet runs it
(uid 65532, no capability, its store handed over by the DaemonSet's own store-owner step) and
the webhook's pod, whose init container runs in the pod's own mount namespace as an arbitrary
non-root uid. The model must appear through the bind mount the pod already has (the very
directory kubelet set up), the node must be labelled warm, and a second model must publish
beside the first.

Two ways the directory comes to be: the webhook's ``Directory`` hostPath, which kubelet never
creates (it waits until the agent, which sees the pod bound through its pod informer, made
it); and a ``DirectoryOrCreate`` one of an older webhook, made by kubelet as root:root 0755
(``models/`` included) before the agent ever ran on the node, which the store-owner step
hands over at the agent's start, keeping its inode.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.reference import parse
from tests.deploy import render
from tests.deploy.render import find
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.fixtures import AGENT_TOKEN, kube_api  # noqa: F401
from tests.kubeapi.objects import namespace, node
from tests.node.hostpath import run_init_in_pod, set_up
from tests.servers.agent import REPO, AgentProcess
from tests.servers.nginx import ServedDir
from webhook.plan import STORE_VOLUME, Plan, plan
from webhook.settings import PlanSettings

pytestmark = pytest.mark.slow

NODE, NS = "n1", "team-a"
AGENT_UID = 65532
STORE = "/var/lib/modelcache"


@pytest.fixture
def node_root() -> Iterator[Path]:
    """The node's file system for this test: a directory every uid may traverse (pytest's
    own temporary directories are root's alone), removed afterwards."""
    for path in (REPO, REPO / "agent", Path(sys.executable).resolve().parent):
        # the agent and the init container run from this checkout as other uids
        assert os.stat(path).st_mode & 0o005 == 0o005, f"{path} is not readable by others"
    root = Path(tempfile.mkdtemp(prefix="modelcache-node-"))
    os.chmod(root, 0o755)  # noqa: S103 - the agent's and the pod's uids must reach it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemonset() -> dict[str, Any]:
    spec: dict[str, Any] = find(render.render("self-signed"), "DaemonSet",
                                "modelcache-agent")["spec"]["template"]["spec"]
    return spec


@pytest.fixture
def cluster(kube_api: FakeKubeApi) -> FakeKubeApi:  # noqa: F811 (pytest injects it)
    kube_api.cluster.create("nodes", node(NODE, {}))
    kube_api.cluster.create("namespaces", namespace(NS))
    return kube_api


async def prepare_store(spec: dict[str, Any], store: Path) -> None:
    """kubelet's part of the DaemonSet's store hostPath, then its store-owner step as the
    manifest runs it: its args, as root with only the capabilities it adds."""
    (volume,) = [v for v in spec["volumes"] if "hostPath" in v]
    await set_up({"hostPath": {**volume["hostPath"], "path": str(store)}})
    (step,) = spec["initContainers"]
    assert step["securityContext"]["runAsUser"] == 0
    caps = ",".join(f"+{c.lower()}" for c in step["securityContext"]["capabilities"]["add"])
    # the image's entrypoint is modelcache (python -m agent here), unless a command replaces it
    argv = step.get("command") or [sys.executable, "-m", "agent"]
    argv = [a.replace(STORE, str(store)) for a in (*argv, *step.get("args", ()))]
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--clear-groups", f"--inh-caps=-all,{caps}", f"--bounding-set=-all,{caps}",
        *argv, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


@pytest.fixture
async def node_agent(cluster: FakeKubeApi, node_root: Path,
                     daemonset: dict[str, Any]) -> AsyncIterator[AgentProcess]:
    """Started by each test (after what kubelet did before it): ``await start()``."""
    kubeconfig = cluster.write_kubeconfig(node_root / "agent.kubeconfig", token=AGENT_TOKEN)
    os.chmod(kubeconfig, 0o644)
    sc = {**daemonset["securityContext"],
          **daemonset["containers"][0]["securityContext"]}
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == AGENT_UID
    agent = AgentProcess(node_root / STORE.lstrip("/"), log_dir=node_root / "logs",
                         kubeconfig=kubeconfig, node=NODE, user=AGENT_UID)
    try:
        yield agent
    finally:
        await asyncio.to_thread(agent.stop)


async def start(agent: AgentProcess, daemonset: dict[str, Any]) -> None:
    await prepare_store(daemonset, agent.store)
    await asyncio.to_thread(agent.start)


def admitted(uri: str, name: str, store: Path, agent_url: str) -> dict[str, Any]:
    """The pod as the webhook mutates it (fallback none: only the agent may provide it)."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS,
                        "labels": {"modelcache.io/inject": "true"},
                        "annotations": {"modelcache.io/model": uri,
                                        "modelcache.io/fallback": "none"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    settings = PlanSettings(store_path=str(store), agent_url=agent_url,
                            allow_hosts=("127.0.0.1",))  # the test's nginx
    result = plan(pod, {}, settings, NS)
    assert isinstance(result, Plan) and result.mode == "cache", result
    return result.pod


def bind(cluster: FakeKubeApi, pod: dict[str, Any]) -> str:
    """The scheduler binds the pod to the node; kubelet's projected token for it."""
    pod["spec"]["nodeName"] = NODE
    created = cluster.cluster.create("pods", pod, NS)
    name = pod["metadata"]["name"]
    token = f"pod-token-{name}"
    cluster.auth.add_service_account_token(token, NS, "default", audiences=["modelcache"],
                                           pod=(name, created["metadata"]["uid"]), node=NODE)
    return token


def store_volume(pod: dict[str, Any]) -> dict[str, Any]:
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == STORE_VOLUME]
    return dict(volume)


def init_command(pod: dict[str, Any]) -> list[str]:
    command: list[str] = pod["spec"]["initContainers"][0]["command"]
    return command


async def serve_pod(cluster: FakeKubeApi, agent: AgentProcess, node_root: Path,
                    pod: dict[str, Any], token: str, host_inode: int) -> dict[str, Any]:
    """Run the pod's init container in its mount namespace; check what it saw."""
    host_path = Path(store_volume(pod)["hostPath"]["path"])
    scratch = node_root / f"pod-{pod['metadata']['name']}"
    scratch.mkdir()
    seen = await run_init_in_pod(host_path, init_command(pod), token, scratch,
                                 env={"MODELCACHE_NODE_NAME": NODE})
    assert seen["code"] == 0, seen["stderr"] + agent.log()[-3000:]
    assert seen["before"] == [], "the pod's mount was set up before the model was published"
    # the very directory kubelet bound: its inode, seen from inside the pod and the host
    assert seen["side_inode"] == host_inode == os.stat(host_path).st_ino
    assert seen["after"] and "manifest.json" in seen["after"]
    return seen


async def test_a_cold_node_warms_through_the_pods_own_bind_mount(
        cluster: FakeKubeApi, node_agent: AgentProcess, node_root: Path,
        daemonset: dict[str, Any], nginx_dir: ServedDir) -> None:
    data = {"one.safetensors": os.urandom(300_000), "two.safetensors": os.urandom(200_000)}
    for name, content in data.items():
        (nginx_dir.path / name).write_bytes(content)
    await start(node_agent, daemonset)
    store = node_agent.store
    keys = []
    for i, name in enumerate(data):
        uri = nginx_dir.url(name)
        pod = admitted(uri, f"server-{i}", Path(STORE), node_agent.url)
        volume = store_volume(pod)
        assert volume["hostPath"]["type"] == "Directory", "kubelet must never make it"
        volume["hostPath"]["path"] = volume["hostPath"]["path"].replace(STORE, str(store))
        pod["spec"]["volumes"] = [volume if v["name"] == STORE_VOLUME else v
                                  for v in pod["spec"]["volumes"]]
        token = bind(cluster, pod)
        await set_up(volume)  # waits until the agent, told by its pod watch, made it
        host_path = Path(volume["hostPath"]["path"])
        st = os.stat(host_path)
        assert (st.st_uid, st.st_mode & 0o777) == (AGENT_UID, 0o755)
        seen = await serve_pod(cluster, node_agent, node_root, pod, token, st.st_ino)
        assert seen["files"] == {name: hashlib.sha256(data[name]).hexdigest()}
        assert seen["links"][name].startswith(str(node_root / f"pod-server-{i}" / "side"))
        ref = parse(uri)
        keys.append(ref.key)
        async with asyncio.timeout(15):  # the node is labelled warm
            await cluster.cluster.wait_until(lambda label=ref.node_label: (
                cluster.cluster.get("nodes", NODE)["metadata"].get("labels") or {})
                .get(label) == "ready")
    # the second model was published beside the first, which is still there
    for key in keys:
        assert (store / "models" / key / "manifest.json").is_file()
    proc_mounts = Path("/proc/self/mountinfo").read_text()
    assert str(node_root) not in proc_mounts, "every mount was the pod namespace's own"


async def test_directories_kubelet_made_before_the_agent_are_handed_over(
        cluster: FakeKubeApi, node_agent: AgentProcess, node_root: Path,
        daemonset: dict[str, Any], nginx_dir: ServedDir) -> None:
    """A pod of an older webhook (``DirectoryOrCreate``) bound before the agent first ran on
    the node: kubelet made the store, ``models/`` and ``models/<key>`` as root:root 0755."""
    content = os.urandom(250_000)
    (nginx_dir.path / "w.safetensors").write_bytes(content)
    uri = nginx_dir.url("w.safetensors")
    store = node_agent.store
    pod = admitted(uri, "old-0", Path(STORE), "http://127.0.0.1:1")
    volume = store_volume(pod)
    volume["hostPath"] = {"path": volume["hostPath"]["path"].replace(STORE, str(store)),
                          "type": "DirectoryOrCreate"}
    pod["spec"]["volumes"] = [volume if v["name"] == STORE_VOLUME else v
                              for v in pod["spec"]["volumes"]]
    token = bind(cluster, pod)
    await set_up(volume)
    host_path = Path(volume["hostPath"]["path"])
    for made in (store, store / "models", host_path):
        st = os.stat(made)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o755), made
    inode = os.stat(host_path).st_ino
    await start(node_agent, daemonset)  # its store-owner step, then the agent itself
    command = init_command(pod)
    command[command.index("--agent-url") + 1] = node_agent.url
    pod["spec"]["initContainers"][0]["command"] = command
    seen = await serve_pod(cluster, node_agent, node_root, pod, token, inode)
    assert seen["files"] == {"w.safetensors": hashlib.sha256(content).hexdigest()}
    assert os.stat(host_path).st_uid == AGENT_UID

