"""The cluster configs in cluster/ are valid and agree with the code: each parses, has the fields its
tool requires, gives GPUs to the workers, and names a job spec that exists in jobs/ and validates, with
the flags the config adds. The Ray launcher config is checked against Ray's own cluster-config schema.
The CronJob's and RayJob's submitter scripts are run by a real shell, with `scriptorium` and `ray`
standing in as recording stubs, to show that they stop the Ray job when their deadline passes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from scriptorium.core.spec import load_spec, output_uri_for_run
from scriptorium.jobs.cli import build_parser
from scriptorium.jobs.submit import prepare_submission
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


def run_with_stubs(script: str, tmp_path: Path, env: dict | None = None) -> tuple[int, list[list[str]]]:
    """Run a submitter script with `scriptorium` and `ray` replaced by stubs that record their arguments:
    `ray job status` finds no job, `ray job logs --follow` and `scriptorium submit --wait` follow a job that
    never ends. Returns the exit status and the recorded commands."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    record = f'printf "%s\\037" "$(basename "$0")" "$@" >> {calls}; echo >> {calls}\n'
    (bin_dir / "scriptorium").write_text(f"#!/bin/sh\n{record}exec sleep 60\n")
    (bin_dir / "ray").write_text(f"#!/bin/sh\n{record}"
                                 'case "$2" in status) exit 1;; logs) exec sleep 60;; esac\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    done = subprocess.run(["/bin/sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                          **(env or {})},
                          capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, [line.rstrip("\037").split("\037") for line in lines]


def with_short_deadline(script: str, deadline_s: int) -> str:
    """The script with its `timeout N` of a day or two cut down to a second, and N checked first."""
    match = re.search(r"\btimeout (\d+) ", script)
    assert match and int(match.group(1)) < deadline_s, "the script's deadline must come before the backstop's"
    return script.replace(match.group(0), "timeout 1 ")


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
    assert args.wait  # a retry on a fresh cluster waits out the dead attempt's lease
    job_spec = load_spec(repo_path(args.job)).check_runnable()
    # Enough GPU workers for every model replica the spec asks for.
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= job_spec.resources.num_replicas * job_spec.resources.gpus_per_replica


@pytest.mark.slow
def test_rayjob_submitter_submits_the_entrypoint_and_stops_the_job_when_its_deadline_passes(tmp_path):
    spec = documents("kuberay-rayjob.yaml")["RayJob"]["spec"]
    container = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script = with_short_deadline(container["args"][0], spec["activeDeadlineSeconds"])

    # KubeRay gives the submitter these two (see its getSubmitterTemplate).
    status, calls = run_with_stubs(script, tmp_path, {"RAY_DASHBOARD_ADDRESS": "head-svc:8265",
                                                      "RAY_JOB_SUBMISSION_ID": "rayjob-abc"})

    assert status == 124  # the deadline passed
    head = ["--address", "http://head-svc:8265"]
    submit = ["ray", "job", "submit", *head, "--submission-id", "rayjob-abc", "--no-wait", "--"]
    assert calls[0] == ["ray", "job", "status", *head, "rayjob-abc"]
    assert calls[1] == submit + shlex.split(spec["entrypoint"])  # exactly the RayJob's entrypoint
    assert calls[2] == ["ray", "job", "logs", *head, "--follow", "rayjob-abc"]
    assert calls[3] == ["ray", "job", "stop", *head, "rayjob-abc"] and len(calls) == 4


def cronjob_script() -> tuple[dict, str]:
    cron = documents("kuberay-cronjob.yaml")["CronJob"]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return cron, container["args"][0]


def test_cronjob_submits_an_existing_job_spec_to_the_rayclusters_head(tmp_path):
    cron, script = cronjob_script()
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"  # one writer per output

    (submit_line,) = [line for line in script.splitlines() if "scriptorium submit" in line]
    argv = shlex.split(submit_line)
    assert argv[:2] == ["timeout", argv[1]] and argv[2:4] == ["scriptorium", "submit"]
    head = documents("kuberay-raycluster.yaml")["RayCluster"]["metadata"]["name"] + "-head-svc"
    variables = {"head": f"http://{head}:8265", "run": "nightly-20260101", "submission": "scriptorium-nightly-x"}
    args = build_parser().parse_args([re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], a) for a in argv[3:]])
    assert args.address == f"http://{head}:8265"
    assert args.wait
    assert args.run_flags[-1] == "--wait"  # `scriptorium run` waits for an earlier night's run still going

    args.job = str(repo_path(args.job))
    submission = prepare_submission(args, str(tmp_path))  # loads and validates the spec with the flags
    assert submission.run_id == "nightly-20260101"
    assert (tmp_path / Path(args.job).name).is_file()


@pytest.mark.slow
def test_cronjob_stops_the_ray_job_it_submitted_when_its_deadline_passes(tmp_path):
    cron, script = cronjob_script()
    backstop = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    status, calls = run_with_stubs(with_short_deadline(script, backstop), tmp_path)

    assert status == 124
    (submit,), (stop,) = [c for c in calls if c[0] == "scriptorium"], [c for c in calls if c[0] == "ray"]
    submission = submit[submit.index("--submission-id") + 1]
    assert submission.startswith("scriptorium-nightly-") and submission.endswith(subprocess.check_output(
        ["hostname"], text=True).strip())  # one id per pod: a retried pod's submission is a new one
    address = submit[submit.index("--address") + 1]
    assert stop == ["ray", "job", "stop", "--address", address, submission]


def test_dockerfile_uses_the_pinned_ray_and_puts_the_repo_where_the_manifests_look():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", dockerfile, re.M)
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)
    assert re.search(r"^COPY --chown=ray:users jobs/\*\.toml jobs/$", dockerfile, re.M)


def test_dockerfile_installs_the_wheel_built_from_every_package_folder():
    """The image holds the installed wheel (tests/test_wheel.py builds and runs the same), not the checkout."""
    import tomllib

    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    wheel_stage, image = dockerfile.split("\nFROM rayproject/")
    for folder in folders:
        assert re.search(rf"^COPY {folder} {folder}$", wheel_stage, re.M), f"the wheel stage leaves out {folder}/"
    assert "pip wheel" in wheel_stage
    assert re.search(r"^RUN pip install .*/tmp/dist/scriptorium-\*\.whl\)\[cluster\]", image, re.M)
    assert not re.search(r"^COPY .*(core|connectors|pipeline) ", image, re.M)


# The ready-made cluster jobs (README), and the published checkpoint each runs.
READY_MADE_JOBS = {
    "digitize_archive": "HuggingFaceM4/idefics2-8b",
    "caption_corpus": "HuggingFaceM4/idefics2-8b",
    "caption_corpus_smolvlm": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "document_qa": "HuggingFaceM4/idefics2-8b",
    "extract_invoices": "HuggingFaceM4/idefics2-8b",
}


def test_every_job_spec_in_jobs_is_checked():
    """A spec added to jobs/ is one of the ready-made jobs checked below (or the laptop demo)."""
    assert {path.stem for path in (REPO / "jobs").glob("*.toml")} == {*READY_MADE_JOBS, "demo"}


@pytest.mark.parametrize("name", sorted(READY_MADE_JOBS))
def test_ready_made_job_specs_load_validate_and_partition_output_by_run(name):
    spec = load_spec(REPO / "jobs" / f"{name}.toml").check_runnable()
    assert spec.run_id
    assert output_uri_for_run(spec.output.uri, "2026-11").endswith("/run_id=2026-11")  # a partition per run
    assert spec.model.id == READY_MADE_JOBS[name]
    assert spec.resources.address == "auto"  # joins a cluster, never starts a local Ray with GPU replicas
    assert spec.resources.num_replicas >= 1 and spec.resources.gpus_per_replica == 1


def pod_containers(doc) -> list[dict]:
    """Every container of every pod template anywhere in a parsed YAML document."""
    found = []
    if isinstance(doc, dict):
        if "containers" in doc and isinstance(doc["containers"], list):
            found += doc["containers"]
        for value in doc.values():
            found += pod_containers(value)
    elif isinstance(doc, list):
        for value in doc:
            found += pod_containers(value)
    return found


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-cronjob.yaml"])
def test_kuberay_configs_turn_on_token_auth_with_the_token_from_a_secret(name):
    # Without a token a `ray start --head` serves the Jobs API (arbitrary code) to anyone reaching :8265.
    containers = [c for d in documents(name).values() for c in pod_containers(d)]
    assert containers
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}  # the RayJob's and CronJob's submitters too
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= set(env), f"{container['name']} has no Ray auth token"
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never in the file
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]


def test_cluster_launcher_starts_every_node_with_token_auth_from_the_secret_store():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "secretsmanager get-secret-value" in command


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_prometheus_scrapes_every_ray_pod_on_its_metrics_port(name):
    """Every pod group, head and workers, exports its metrics (Ray's and ray_scriptorium_*) on the port
    its container names `metrics`, and carries the labels the PodMonitor selects (kuberay-raycluster.yaml)."""
    monitor = documents("kuberay-raycluster.yaml")["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    kinds = documents(name)
    cluster = kinds["RayCluster"]["spec"] if "RayCluster" in kinds else kinds["RayJob"]["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in groups:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert int(group["rayStartParams"]["metrics-export-port"]) == ports["metrics"]
