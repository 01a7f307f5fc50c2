"""The real things the live dashboard test watches, and what it makes them do.

- a Hugging Face-compatible hub on loopback (``tests/servers/hfhub.py``) holding small
  models, two of which share a weights file;
- two real agent processes (``python -m agent agent --standalone``), one per "node"
  (``--node-name``), each with its own store, pulling from the hub, and a signature policy
  trusting the key that signs one model a round (``model_signing sign key``);
- a plain HTTP server on 127.0.0.2, which pods may reach but the agents' egress policy
  refuses (loopback is allowed only as 127.0.0.1): a real init container
  (``python -m agent init``) asks its node's agent, whose pull fails, falls back to the
  source itself and reports the fallback;
- node-a's agent is also a CSI node plugin (``--csi-endpoint``): kubelet's publish of a warm
  model for a pod (kept mounted, under the test's directory, until the end) and a bad one;
- a real webhook process (``python -m webhook``) serving TLS with a certificate minted by
  ``modelcache webhook certs`` for the Service's DNS names, called by name the way the API
  server calls it, and sent AdmissionReviews built from the pods of ``deploy/examples``.

:meth:`Cluster.round` is one round of activity (misses, hits, pulls that fail, dedup, a
blob served to a peer, a delete and a gc, a fallback, admissions of every outcome). The
test runs one round before Prometheus starts and one after it has scraped twice, so that
every counter moves between two scrapes and ``rate()`` sees real increases. :attr:`Cluster.expected`
counts what the rounds did, to compare with what Prometheus saw.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonpatch
import yaml

from agent.csi import mounts
from agent.csi.proto import csi_pb2 as pb
from tests.csi.kubelet import Kubelet, Pod
from tests.deploy import prom
from tests.deploy.render import DEPLOY, ROOT
from tests.servers.agent import AgentProcess
from tests.servers.faulty import FaultyServer, faulty_server
from tests.servers.hfhub import HubServer, hub_server
from tests.servers.net import free_port, wait_until
from tests.servers.proc import ManagedProcess
from tests.verify.signing import KeyPair, Signer

NAMESPACE = "modelcache"
SERVICE = "modelcache-webhook"
SERVER_NAME = f"{SERVICE}.{NAMESPACE}.svc"  # what the API server checks the certificate for
NODES = ("node-a", "node-b")
#: node-b runs with watermarks of its own: the gauge must follow the settings
WATERMARKS = {"node-a": (0.80, 0.70), "node-b": (0.90, 0.60)}
KiB = 1024


def _weights(seed: str, size: int) -> bytes:
    block = seed.encode().ljust(64, b".")
    return (block * (size // len(block) + 1))[:size]


SHARED = _weights("shared-embeddings", 96 * KiB)  # in every round's a and b models


@dataclass
class Webhook:
    """``python -m webhook`` over TLS on 127.0.0.1, no cluster access."""

    workdir: Path
    port: int = 0
    proc: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        return str(self.workdir / "certs" / "ca.crt")

    @property
    def cert_file(self) -> Path:
        return self.workdir / "certs" / "tls.crt"

    def start(self) -> Webhook:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(PYTHONPATH=str(ROOT), KUBECONFIG=str(self.workdir / "no-kubeconfig"))
        subprocess.run(  # the serving pair, from the command the self-signed Job runs
            [sys.executable, "-m", "webhook", "certs", "--service", SERVICE,
             "--namespace", NAMESPACE, "--out-dir", str(self.workdir / "certs")],
            env=env, cwd=ROOT, check=True, capture_output=True, timeout=30)
        self.port = free_port()
        self.proc = ManagedProcess(
            [sys.executable, "-m", "webhook", "--listen", self.address,
             "--tls-cert", str(self.cert_file), "--tls-key", str(self.workdir / "certs" /
                                                                "tls.key"),
             "--shutdown-delay", "0", "--log-level", "warning"],
            name="webhook", log_dir=self.workdir, env=env, cwd=ROOT).start()
        wait_until(lambda: self.call("GET", "/readyz")[0] == 200, timeout=20,
                   what="webhook ready", alive=self.proc.alive)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, reply = prom.request(
            f"https://{self.address}{path}", method=method, body=data,
            headers={"Content-Type": "application/json"} if data else None,
            ca_file=self.ca_file, server_name=SERVER_NAME)
        try:
            return status, json.loads(reply)
        except ValueError:
            return status, reply


# --- admission reviews from the examples ----------------------------------------------------


def example_pods() -> dict[str, dict[str, Any]]:
    """The pods the example workloads create (a Deployment's from its template)."""
    pods = {}
    for path in sorted((DEPLOY / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] not in ("Pod", "Deployment"):
                continue
            if doc["kind"] == "Pod":
                pod = doc
            else:
                template = doc["spec"]["template"]
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {**template["metadata"],
                                    "generateName": f"{doc['metadata']['name']}-",
                                    "namespace": doc["metadata"]["namespace"]},
                       "spec": template["spec"]}
            pods[doc["metadata"]["name"]] = pod
    return pods


def review(pod: dict[str, Any] | None, operation: str = "CREATE",
           namespace: str = "default") -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver posts it for a pod."""
    pods = {"group": "", "version": "v1", "resource": "pods"}
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()), "kind": kind, "resource": pods, "requestKind": kind,
        "requestResource": pods, "namespace": namespace, "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": pod, "oldObject": pod if operation == "UPDATE" else None, "dryRun": False,
        "options": {"kind": f"{operation.title()}Options", "apiVersion": "meta.k8s.io/v1"},
    }
    if pod is not None and (pod["metadata"].get("name")):
        request["name"] = pod["metadata"]["name"]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def outcome_of(pod: dict[str, Any] | None, response: dict[str, Any]) -> str:
    """What the webhook did, read from its answer as the API server reads it."""
    if not response["allowed"]:
        return "error" if response["status"]["code"] >= 500 or \
            response["status"]["reason"] == "BadRequest" else "denied"
    if "patch" not in response:
        return "skipped"
    assert pod is not None and response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert any(c["name"] == "modelcache-init" for c in patched["spec"]["initContainers"])
    return "mutated"


# --- the whole scene ------------------------------------------------------------------------


@dataclass
class Cluster:
    hub: HubServer
    outside: FaultyServer
    """Reachable by pods, refused by the agents' egress policy."""
    agents: dict[str, AgentProcess]
    webhook: Webhook
    workdir: Path
    key: KeyPair
    """The signer's key; the agents' policy ``release`` trusts it."""
    rounds: int = 0
    expected: Counter[tuple[str, ...]] = field(default_factory=Counter)
    """(metric, node or "", label value) -> how many times the rounds made it happen."""

    def _model(self, repo: str, files: dict[str, bytes]) -> str:
        self.hub.create_repo(repo)
        self.hub.commit(repo, files)
        return f"hf://{repo}@main"

    def _pull(self, node: str, uri: str, **fields: Any) -> dict[str, Any]:
        """A miss: the agent pulls, and the caller then has the model from the cache."""
        agent = self.agents[node]
        model = agent.wait_ready(agent.ensure(uri, **fields)["key"], timeout=30)
        assert model["state"] == "ready", model
        self.expected["cache_requests", node, "miss"] += 1
        self.expected["served_bytes", node, "pod"] += model["size_bytes"]
        return model

    def _hit(self, node: str, uri: str) -> None:
        model = self.agents[node].ensure(uri)
        assert model["state"] == "ready"
        self.expected["cache_requests", node, "hit"] += 1
        self.expected["served_bytes", node, "pod"] += model["size_bytes"]

    def _fallback(self, node: str, r: int) -> None:
        """The injected init container, for a model the node's agent may not fetch."""
        data = _weights(f"outside-{r}", 40 * KiB)
        self.outside.add(f"/outside-{r}.safetensors", data)
        uri = self.outside.url(f"/outside-{r}.safetensors")
        agent = self.agents[node]
        mount = self.workdir / node / f"mount-{r}"
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "init", "--uri", uri, "--mount-path", str(mount),
             "--side-path", str(agent.store / "models" / "none"), "--agent-url", agent.url,
             "--token-file", str(agent.store / "admin-token"), "--connect-timeout", "5",
             "--log-level", "warning"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert (mount / f"outside-{r}.safetensors").read_bytes() == data
        self.expected["cache_requests", node, "miss"] += 1  # the agent was asked first
        self.expected["pull_failures", node, "not_allowed"] += 1
        self.expected["cache_requests", node, "fallback"] += 1

    def _publish(self, node: str, uri: str, model: dict[str, Any]) -> None:
        """kubelet publishes a warm model for a new pod (and keeps it), then sends a request
        without a model."""
        root = self.workdir / node / "kubelet"
        kubelet = Kubelet(self.workdir / node / "plugin" / "csi.sock", root)
        pod = Pod(uid=str(uuid.uuid4()))
        kubelet.volume_dir(pod, "model").mkdir(parents=True)
        good = kubelet.publish_request(pod, "model", {"model": uri})
        bad = kubelet.publish_request(pod, "other", {"include": "*.json"})
        with grpc.insecure_channel(f"unix://{kubelet.socket}") as channel:
            call = channel.unary_unary(
                "/csi.v1.Node/NodePublishVolume",
                request_serializer=pb.NodePublishVolumeRequest.SerializeToString,
                response_deserializer=pb.NodePublishVolumeResponse.FromString)
            call(good, timeout=30)
            try:
                call(bad, timeout=30)
                raise AssertionError("a publish without a model was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert (kubelet.target(pod, "model") / "config.json").is_file()
        self.expected["csi_publishes", node, "ok"] += 1
        self.expected["csi_publishes", node, "invalid"] += 1
        self.expected["cache_requests", node, "hit"] += 1
        self.expected["served_bytes", node, "pod"] += model["size_bytes"]

    def round(self) -> None:
        """One round of everything the dashboard shows."""
        self.rounds += 1
        r = self.rounds
        a, b = self.agents["node-a"], self.agents["node-b"]
        # node-a: two models sharing a weights file (the second finds it stored: dedup), a
        # hit, a blob read by a peer, then one model deleted and its blob collected
        config = json.dumps({"model_type": "tiny", "round": r}).encode()
        first = self._model(f"org/first-{r}", {"config.json": config,
                                               "shared.safetensors": SHARED,
                                               "first.safetensors": _weights(f"f{r}", 64 * KiB)})
        second = self._model(f"org/second-{r}", {"config.json": config,
                                                 "shared.safetensors": SHARED,
                                                 "second.safetensors": _weights(f"s{r}", 32 * KiB)})
        first_model = self._pull("node-a", first)
        second_model = self._pull("node-a", second)
        # found stored by the digest the hub states: the second model's shard (sha256),
        # config.json and .gitattributes (git blob ids); from round 2 on, also the first
        # model's shard and .gitattributes, which the last round's second model still holds
        self.expected["dedup_hits", "node-a", ""] += 5 if r > 1 else 3
        self._hit("node-a", second)
        self._publish("node-a", second, second_model)
        (shared,) = [f for f in first_model["files"] if f["path"] == "shared.safetensors"]
        status, _ = a.call("GET", f"/api/v1/blobs/{shared['blake3']}")
        assert status == 200
        self.expected["served_bytes", "node-a", "peer"] += len(SHARED)
        status, gone = a.call("DELETE", f"/api/v1/models/{first_model['key']}")
        assert status == 200 and gone["freed_bytes"] > 0  # first.safetensors, nobody's now
        self.expected["evictions", "node-a", "api"] += 1
        status, _ = a.call("POST", "/api/v1/gc")
        assert status == 200
        # node-b: a model that does not exist (a failed pull), and one that does, twice
        missing = b.wait_ready(b.ensure(f"hf://org/missing-{r}@main")["key"], timeout=30)
        assert missing["state"] == "failed", missing
        self.expected["cache_requests", "node-b", "miss"] += 1
        # as the Hub does, the hub answers 401 to an anonymous request for a repository it
        # does not show (missing or private): a failure of authorization, by its reason
        self.expected["pull_failures", "node-b", "auth"] += 1
        third = self._model(f"org/third-{r}", {"model.safetensors": _weights(f"t{r}", 48 * KiB)})
        self._pull("node-b", third)
        if r > 1:  # its .gitattributes, which the last round's third model holds
            self.expected["dedup_hits", "node-b", ""] += 1
        self._hit("node-b", third)
        # a signed model pulled under the policy that trusts its key
        files = Signer(self.workdir / f"signing-{r}").with_key(
            {"config.json": b'{"signed": %d}' % r,
             "model.safetensors": _weights(f"v{r}", 24 * KiB)}, self.key)
        self.hub.create_repo(f"org/signed-{r}", gitattributes=False)
        self.hub.commit(f"org/signed-{r}", files)
        signed = self._pull("node-b", f"hf://org/signed-{r}@main", verify="release")
        assert signed["verified"]["policy"] == "release", signed
        self.expected["verifications", "node-b", "passed"] += 1
        self._fallback("node-b", r)
        self._admit()

    def _admit(self) -> None:
        """The example workloads' pods (mutated), an update and a pod in the webhook's own
        namespace (skipped), a relative mount path (denied), a review without its pod
        (error)."""
        pods = example_pods()
        vllm = pods["qwen-vllm"]
        bad = json.loads(json.dumps(vllm))
        bad["metadata"]["annotations"]["modelcache.io/mount-path"] = "models"
        cases = [(p, review(p), "mutated") for p in pods.values()]
        cases += [(vllm, review(vllm, "UPDATE"), "skipped"),
                  (vllm, review(vllm, namespace=NAMESPACE), "skipped"),
                  (bad, review(bad), "denied"),
                  (None, review(None), "error")]
        for pod, body, wanted in cases:
            status, answer = self.webhook.call("POST", "/mutate", body)
            assert status == 200, answer
            response = answer["response"]
            assert response["uid"] == body["request"]["uid"]
            assert outcome_of(pod, response) == wanted, (wanted, response)
            self.expected["admissions", "", wanted] += 1


CSI_NODE = "node-a"


def csi_flags(node_dir: Path) -> list[str]:
    (node_dir / "kubelet" / "pods").mkdir(parents=True)
    return ["--csi-endpoint", f"unix://{node_dir}/plugin/csi.sock",
            "--csi-kubelet-dir", str(node_dir / "kubelet")]


def unmount_under(root: Path) -> None:
    for m in reversed(mounts.mount_table()):
        if m.mount_point.startswith(f"{root}/"):
            mounts.unmount(Path(m.mount_point))


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[Cluster]:
    """The hub, two agents and the webhook, started; everything stopped on exit."""
    with hub_server() as hub, faulty_server("127.0.0.2") as outside, \
            contextlib.ExitStack() as stack:
        stack.callback(unmount_under, workdir)  # the last step: every publish kept
        agents = {}
        key = KeyPair.make(workdir / "keys", "release")
        for node in NODES:
            high, low = WATERMARKS[node]
            agent = AgentProcess(
                workdir / node / "store", log_dir=workdir / node, name=node,
                env={"HF_ENDPOINT": hub.base_url, "HF_HUB_DISABLE_XET": "1"},
                extra_args=["--node-name", node, "--high-watermark", str(high),
                            "--low-watermark", str(low), "--log-level", "info",
                            *(csi_flags(workdir / node) if node == CSI_NODE else [])],
                config=f"verifyPolicies: {{release: {{publicKey: {key.public}}}}}\n")
            stack.callback(agent.stop)
            agents[node] = agent.start()
        webhook = Webhook(workdir / "webhook")
        webhook.workdir.mkdir(parents=True)
        stack.callback(webhook.stop)
        yield Cluster(hub, outside, agents, webhook.start(), workdir, key)
