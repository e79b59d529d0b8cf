"""A multi-node Ray cluster on this one machine, in its own process, for the scale-out tests.

`ray.cluster_utils.Cluster` starts a head and worker nodes (each a raylet with its own object store and
worker processes) exactly as separate machines would run them; only the network is loopback. It runs in
a child process so the test process's own Ray (the `ray_local` fixture) is never touched, and with a
private RAY_TMPDIR so no other Ray on the machine can discover it (Cluster records its address in
`$RAY_TMPDIR/ray_current_cluster`, which a plain `ray.init()` elsewhere would otherwise join).

    with LocalCluster(head={"num_cpus": 0}, workers=[{"num_cpus": 2, "num_gpus": 1}]) as cluster:
        run_cli("run", ..., "--address", cluster.address, env=cluster.env)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile


# Runs in the child: start the nodes, report them on stdout, stay up until stdin closes.
_CLUSTER_MAIN = r"""
import json, sys
from ray.cluster_utils import Cluster

config = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args=config["head"])
workers = [cluster.add_node(**args) for args in config["workers"]]
cluster.wait_for_nodes()
print(json.dumps({
    "address": cluster.address,
    "dashboard": cluster.webui_url,
    "head": cluster.head_node.node_id,
    "workers": [node.node_id for node in workers],
}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


class LocalCluster:
    """Context manager: a Ray head plus worker nodes; `address`, `head`, `workers` (node ids), `env`."""

    def __init__(self, head: dict, workers: list[dict], start_timeout: float = 120):
        self.config = {"head": {"include_dashboard": False, **head}, "workers": workers}
        self.start_timeout = start_timeout
        # Short path: Ray puts Unix sockets under it, and socket paths are limited to ~107 bytes.
        self.tmpdir = tempfile.mkdtemp(prefix="scr-ray-", dir="/tmp")
        self.env = {
            **os.environ,
            "RAY_TMPDIR": self.tmpdir,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Jobs submitted to the cluster run `scriptorium ...`: it must be on the nodes' PATH.
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        }
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LocalCluster":
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CLUSTER_MAIN, json.dumps(self.config)],
            cwd=self.tmpdir, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        if not line:
            self.__exit__(None, None, None)
            raise RuntimeError("the local Ray cluster did not start (see the test's captured stderr)")
        info = json.loads(line)
        self.address, self.head, self.workers = info["address"], info["head"], info["workers"]
        self.dashboard = f"http://{info['dashboard']}" if info.get("dashboard") else None
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()  # the child shuts its nodes down one by one
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
