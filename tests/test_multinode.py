"""A job across a multi-node Ray cluster: every model replica on every GPU node does work, and the
result is complete and exactly-once.

The cluster runs on this one machine (`ray.cluster_utils.Cluster`): a head that takes no work, two
worker nodes that each declare one GPU, and one CPU-only worker node that renders and preprocesses. There is no real
GPU, so the model runs with device="cpu" while Ray places one replica per declared GPU, exactly as it
places them on a cluster of GPU machines. The job joins the cluster through `[resources] address`.
"""

from __future__ import annotations

import pytest

from tests.conftest import make_image, make_pdf, read_rows, run_cli
from tests.local_cluster import LocalCluster

pytestmark = pytest.mark.slow

N_PDFS, PAGES_PER_PDF, N_IMAGES = 6, 3, 6


@pytest.fixture
def archive(tmp_path):
    docs = tmp_path / "archive"
    docs.mkdir()
    for i in range(N_PDFS):
        make_pdf(docs / f"report-{i}.pdf", [f"Report {i}, page {p}" for p in range(PAGES_PER_PDF)])
    for i in range(N_IMAGES):
        make_image(docs / f"scan-{i}.png", color=(20 * i, 100, 200), text=f"scan {i}")
    return docs


def test_job_spreads_over_gpu_nodes_and_writes_each_page_once(tmp_path, archive, tiny_model):
    # Each GPU node's one CPU goes to its model replica, so pages are rendered on the CPU node and no
    # replica is favoured for holding them locally: which replica gets a batch is up to the scheduler.
    gpu_node = {"num_cpus": 1, "num_gpus": 1}
    with LocalCluster(head={"num_cpus": 0}, workers=[gpu_node, gpu_node, {"num_cpus": 3}]) as cluster:
        gpu_nodes = set(cluster.workers[:2])
        output = tmp_path / "out" / "run_id={run_id}"
        spec = tmp_path / "job.toml"
        spec.write_text(f"""
run_id = "multinode"
[input]
uri = "{archive}"
[output]
uri = "{output}"
[model]
id = "{tiny_model}"
device = "cpu"
[[tasks]]
kind = "ocr"
max_new_tokens = 4
[resources]
address = "{cluster.address}"
num_replicas = 2
gpus_per_replica = 1
cpus_per_replica = 1
batch_size = 2
""")
        # Replicas start at different speeds on a loaded machine, and one that is up first could finish
        # a small job alone. Holding the first batch until both are up makes the check deterministic
        # (on a real cluster, a late replica simply joins in when it is ready).
        env = {**cluster.env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
        done = run_cli("run", "--job", str(spec), env=env, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]

    rows = read_rows(tmp_path / "out" / "run_id=multinode")
    expected = {(str(archive / f"report-{i}.pdf"), p) for i in range(N_PDFS) for p in range(PAGES_PER_PDF)}
    expected |= {(str(archive / f"scan-{i}.png"), 0) for i in range(N_IMAGES)}
    keys = [(r["source_uri"], r["page"]) for r in rows]
    assert sorted(keys) == sorted(expected)  # complete, and no page written twice
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["run_id"] for r in rows} == {"multinode"}

    # One replica per declared GPU, on the GPU nodes only, and each of them processed pages.
    pages_by_node = {}
    for r in rows:
        pages_by_node.setdefault(r["node"], set()).add(r["replica"])
    assert set(pages_by_node) == gpu_nodes, (pages_by_node, gpu_nodes)
    assert all(len(replicas) == 1 for replicas in pages_by_node.values())
    assert len({r["replica"] for r in rows}) == 2
