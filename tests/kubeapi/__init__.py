"""A fake kube-apiserver for tests: the semantics the agent relies on, over real HTTP.

    async with FakeKubeApi() as api:          # 127.0.0.1, free port; tls=True for HTTPS
        api.write_kubeconfig(tmp_path / "kubeconfig", token=...)
        api.cluster.create("pods", {...}, namespace="default")   # act as a controller would
        api.cluster.break_watches()                              # hooks: see Cluster, FakeKubeApi

See ``cluster.py`` for the object and watch semantics and ``server.py`` for the HTTP side.
"""

from tests.kubeapi.auth import Auth, User, service_account_user
from tests.kubeapi.cluster import Cluster
from tests.kubeapi.server import FakeKubeApi, Request, load_crds

__all__ = ["Auth", "Cluster", "FakeKubeApi", "Request", "User", "load_crds",
           "service_account_user"]
