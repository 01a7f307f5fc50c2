"""What the control plane costs per state change, at N simulated nodes.

The harness of ``tests/cluster/test_cluster_controlplane.py`` (``tests/cluster/
controlplane.py``): the agent's real status writer and CachedModel informer for each of N
nodes and the webhook's real counts controller roll one CachedModel out through the fake
apiserver on loopback (the real kubernetes_asyncio client over HTTP), each phase (pulling,
progress, ready) spread over ``--window`` virtual seconds. Prints, per N: bytes written per
state change (request bodies: NodeCaches, counts, Events), bytes sent on the NodeCache
watch and on the CachedModel watches per change, the counts writes, and the sizes of the
largest NodeCache and of the CachedModel. Virtual time: the figures are the protocol's, not
this machine's speed (a run at 1,000 nodes takes about 30 s).

    python bench/controlplane.py [--nodes 10 100 1000] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster.controlplane import Figures, simulate  # noqa: E402 - after the path is set
from tests.kubeapi import FakeKubeApi  # noqa: E402


async def run(nodes: list[int], window: int) -> None:
    print(Figures.HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-controlplane-") as tmp:
        for n in nodes:
            async with FakeKubeApi(history=20 * n + 1000) as api:
                figures = await simulate(api, n, Path(tmp) / str(n), window=window)
            print(figures.row(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--window", type=int, default=60, help="virtual seconds per phase")
    args = p.parse_args()
    asyncio.run(run(args.nodes, args.window))


if __name__ == "__main__":
    main()
