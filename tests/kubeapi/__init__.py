"""A fake kube-apiserver for tests: the semantics the agent relies on, over real HTTP.

    async with FakeKubeApi() as api:          # 127.0.0.1, free port; tls=True for HTTPS
        api.write_kubeconfig(tmp_path / "kubeconfig", token=...)
        api.cluster.create("pods", pod("p", node="n1"), "default")  # as a controller would
        await api.wait_for_watch("pods")      # the client under test is watching
        api.cluster.break_watches()           # hooks: see Cluster and FakeKubeApi

Pytest fixtures (``kube_api``, ``kube``, ``raw_kube``) are in ``fixtures.py``, object
builders in ``objects.py``. ``cluster.py`` holds the object and watch semantics,
``server.py`` the HTTP side, ``auth.py`` tokens and RBAC, ``crd.py`` custom resources.
"""

from tests.kubeapi.auth import Auth, User, service_account_user
from tests.kubeapi.cluster import Cluster
from tests.kubeapi.server import FakeKubeApi, Request, load_crds

__all__ = ["Auth", "Cluster", "FakeKubeApi", "Request", "User", "load_crds",
           "service_account_user"]
