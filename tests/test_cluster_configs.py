"""The cluster configs in cluster/ are valid and agree with the code: each parses, has the fields its
tool requires, gives GPUs to the workers, and names a job spec that exists in jobs/ and validates, with
the flags the config adds. The Ray launcher config is checked against Ray's own cluster-config schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from core.spec import load_spec, output_uri_for_run
from jobs.cli import build_parser
from jobs.submit import prepare_submission
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/scriptorium"  # where cluster/Dockerfile puts the repository in the image


def documents(name: str) -> dict[str, dict]:
    """The YAML documents of cluster/NAME, by kind."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def repo_path(image_path: str) -> Path:
    """A path inside the image -> the same file in this checkout."""
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return REPO / image_path[len(IMAGE_ROOT) + 1:]


def check_ray_cluster_spec(spec: dict) -> None:
    """A KubeRay cluster spec: a head that takes no work, GPU workers, the pinned Ray version."""
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]


def test_cluster_launcher_config_passes_rays_schema_and_autoscales_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a misspelt key or a wrong type

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())  # scale from zero
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("pip install" in c and "/home/ray/scriptorium" in c for c in config["setup_commands"])
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_raycluster_autoscales_gpu_workers_from_zero():
    kinds = documents("kuberay-raycluster.yaml")
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == "scriptorium"
    spec = cluster["spec"]
    check_ray_cluster_spec(spec)
    assert spec["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in spec["workerGroupSpecs"])
    account = kinds["ServiceAccount"]["metadata"]["name"]
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        assert pod["serviceAccountName"] == account


def test_rayjob_runs_an_existing_job_spec_on_its_own_gpu_cluster():
    job = documents("kuberay-rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["scriptorium", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.address == "auto"
    job_spec = load_spec(repo_path(args.job)).check_runnable()
    # Enough GPU workers for every model replica the spec asks for.
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= job_spec.resources.num_replicas * job_spec.resources.gpus_per_replica


def test_cronjob_submits_an_existing_job_spec_to_the_rayclusters_head(tmp_path):
    cron = documents("kuberay-cronjob.yaml")["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"  # one writer per output

    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["command"][2:] + container["args"])
    script = re.sub(r"\$\([^)]*\)", "20260101", script)  # what the shell's $(date ...) gives
    argv = shlex.split(script)
    assert argv[:2] == ["scriptorium", "submit"]
    args = build_parser().parse_args(argv[1:])
    head = documents("kuberay-raycluster.yaml")["RayCluster"]["metadata"]["name"] + "-head-svc"
    assert args.address == f"http://{head}:8265"
    assert args.wait

    args.job = str(repo_path(args.job))
    submission = prepare_submission(args, str(tmp_path))  # loads and validates the spec with the flags
    assert submission.run_id == "nightly-20260101"
    assert (tmp_path / Path(args.job).name).is_file()


def test_dockerfile_uses_the_pinned_ray_and_puts_the_repo_where_the_manifests_look():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", dockerfile, re.M)
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)


@pytest.mark.parametrize("name", ["digitize_archive", "caption_corpus", "document_qa"])
def test_ready_made_job_specs_load_validate_and_partition_output_by_run(name):
    spec = load_spec(REPO / "jobs" / f"{name}.toml").check_runnable()
    assert spec.run_id
    assert output_uri_for_run(spec.output.uri, "2026-11").endswith("/run_id=2026-11")  # a partition per run
    assert spec.model.id == "HuggingFaceM4/idefics2-8b"
    assert spec.resources.address == "auto"  # joins a cluster, never starts a local Ray with GPU replicas
    assert spec.resources.num_replicas >= 1 and spec.resources.gpus_per_replica == 1
