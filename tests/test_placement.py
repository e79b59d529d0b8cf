"""Where model replicas run: device = "auto" is decided once, by the driver, from the cluster's GPUs, and a
replica only ever uses the GPU Ray gave it.

The cluster runs on this one machine (`ray.cluster_utils.Cluster`, tests/local_cluster.py): a head that
takes no work, two worker nodes that each declare one GPU and a CPU-only worker node. There is no real
GPU, so a replica placed on a GPU node cannot load onto CUDA: the replicas here are actors started with
exactly the options the model stage declares (`Stage.resources`, what the processor gives Ray Data), and
they report where Ray put them (node, the GPU ids Ray assigned) before anything needs CUDA. Where a
replica is built, it is the model stage's own step, and it reports what it made of its device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import JobSpec, ModelSpec, ResourceSpec, TaskSpec, spec_from_dict
from scriptorium.pipeline.stages import Stage, derive, job_stages, stage_named
from tests.conftest import REPO, make_pdf, read_rows, run_cli
from tests.local_cluster import LocalCluster

GPU_NODE = {"num_cpus": 2, "num_gpus": 1}
CPU_NODE = {"num_cpus": 2}
REPLICAS = 2


def model_stage(model, device: str, **resources) -> Stage:
    """The model stage of an OCR job on `model` with `device`, as the driver declares it."""
    spec = JobSpec(model=ModelSpec(id=str(model), device=device, dtype="fp32"), tasks=[TaskSpec(kind="ocr")],
                   resources=ResourceSpec(num_replicas=REPLICAS, **resources), run_id="placement")
    return stage_named(job_stages(spec, derive(spec)), "generate")


class Replica:
    """A model replica's actor, reporting where it runs: its node and the GPU ids Ray assigned it, then,
    when given a stage, what the stage's step made of its device (or why it would not start)."""

    def __init__(self, stage: Stage | None = None):
        self.report = {"node": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids()}
        if stage is not None:
            self.report.update(built(stage))

    def where(self) -> dict:
        return self.report


def built(stage: Stage) -> dict:
    """The device the stage's step chose, or its error, and whether this process could reach a GPU."""
    try:
        outcome = {"device": stage.step(**stage.kwargs).device}
    except Exception as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    return {**outcome, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_initialized": torch.cuda.is_initialized()}


def drive(address: str, model: str, gpu_nodes: list[str]) -> dict:
    """The driver's side, in a process of its own joined to the cluster: what the stages declare, and
    where replicas started with exactly those options run."""
    ray.init(address=address, log_to_driver=False)
    actor = ray.remote(Replica)
    on_a_gpu_node = NodeAffinitySchedulingStrategy(gpu_nodes[0], soft=False)

    auto = model_stage(model, "auto")
    replicas = [actor.options(**auto.resources).remote() for _ in range(auto.replicas)]
    placed = ray.get([r.where.remote() for r in replicas], timeout=180)
    for replica in replicas:
        ray.kill(replica)  # their CPUs, for the replicas below
    # A CPU replica (Ray gave it no GPU) on a node with a GPU, and one told "cuda" that Ray gave no GPU.
    cpu = model_stage(model, "cpu")
    cuda_without_gpu = dataclasses.replace(model_stage(model, "cuda"), num_gpus=0.0)
    alone = [actor.options(**stage.resources, scheduling_strategy=on_a_gpu_node).remote(stage)
             for stage in (cpu, cuda_without_gpu)]
    cpu_replica, cuda_replica = ray.get([r.where.remote() for r in alone], timeout=180)
    return {"auto": {"device": auto.kwargs["model"].device, "num_gpus": auto.num_gpus, "replicas": placed},
            "cpu_replica": cpu_replica, "cuda_replica": cuda_replica}


@pytest.fixture(scope="module")
def on_the_cluster(tiny_model):
    """What `drive` saw on a cluster of two GPU-declaring nodes and a CPU-only node."""
    with LocalCluster(head={"num_cpus": 0}, workers=[GPU_NODE, GPU_NODE, CPU_NODE]) as cluster:
        code = ("import json, sys; from tests.test_placement import drive; "
                "print(json.dumps(drive(*json.loads(sys.argv[1]))))")
        arguments = json.dumps([cluster.address, str(tiny_model), cluster.workers[:2]])
        done = subprocess.run([sys.executable, "-c", code, arguments], cwd=REPO, env=cluster.env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        return {**seen, "gpu_nodes": set(cluster.workers[:2]), "cpu_node": cluster.workers[2]}


@pytest.mark.slow
def test_auto_gives_each_replica_one_gpu_and_none_runs_on_the_cpu_only_node(on_the_cluster):
    auto = on_the_cluster["auto"]
    replicas = auto["replicas"]
    assert len(replicas) == REPLICAS
    assert all(len(r["gpus"]) == 1 for r in replicas), replicas
    nodes = [r["node"] for r in replicas]
    assert on_the_cluster["cpu_node"] not in nodes
    assert set(nodes) == on_the_cluster["gpu_nodes"]  # one GPU each: one replica on each GPU node
    assert auto["device"] == "cuda" and auto["num_gpus"] == 1  # decided by the driver, not by each replica


@pytest.mark.slow
def test_a_replica_ray_gave_no_gpu_runs_on_cpu_and_cannot_reach_a_gpu(on_the_cluster):
    replica = on_the_cluster["cpu_replica"]
    assert replica["node"] in on_the_cluster["gpu_nodes"] and replica["gpus"] == []
    assert replica.get("device") == "cpu", replica
    # Ray leaves the node's GPUs visible to an actor that asked for none: the replica hides them itself.
    assert replica["cuda_visible_devices"] == "" and not replica["cuda_initialized"]


@pytest.mark.slow
def test_a_replica_told_cuda_that_ray_gave_no_gpu_fails_saying_so(on_the_cluster):
    replica = on_the_cluster["cuda_replica"]
    assert replica["node"] in on_the_cluster["gpu_nodes"] and replica["gpus"] == []
    assert "device" not in replica  # never a model on CPU, or on a GPU Ray gave someone else
    assert "Ray assigned this replica no GPU" in replica["error"] and "gpus_per_replica" in replica["error"]
    assert not replica["cuda_initialized"]


@pytest.mark.slow
def test_auto_on_a_ray_without_gpus_declares_cpu_replicas_holding_no_gpu(ray_local, tiny_model):
    stage = model_stage(tiny_model, "auto")
    assert stage.kwargs["model"].device == "cpu" and stage.num_gpus == 0  # the replicas are never told "auto"


@pytest.mark.slow
def test_a_job_left_on_auto_without_gpus_runs_on_cpu_and_says_so_once(tmp_path, tiny_model):
    documents = tmp_path / "in"
    documents.mkdir()
    make_pdf(documents / "letter.pdf", ["Dear reader,", "Yours faithfully."])
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nid = "{tiny_model}"\nlongest_edge = 56\nshortest_edge = 28\n[render]\npage_edge = 64\n'
                   '[resources]\nbatch_size = 2\n[[tasks]]\nkind = "ocr"\nmax_new_tokens = 2\n')  # no device: "auto"
    done = run_cli("run", "--job", str(job), "--input", str(documents), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("the model replicas run on CPU") == 1, done.stderr[-3000:]
    assert [r["status"] for r in read_rows(tmp_path / "out")] == ["ok", "ok"]


def test_cuda_with_no_gpu_per_replica_is_refused_with_the_fix():
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "tasks": [{"kind": "ocr"}],
            "model": {"id": "m", "device": "cuda"}, "resources": {"gpus_per_replica": 0}}
    with pytest.raises(SpecError, match="gpus_per_replica = 0.*gpus_per_replica > 0"):
        spec_from_dict(data).check_runnable()
