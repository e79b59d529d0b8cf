"""`scriptorium submit`: a job started from the laptop runs on the cluster, and the laptop can go away.

The end-to-end test starts a real Ray head with the dashboard's Jobs API on this machine, submits a
job spec to it with the CLI, lets the CLI exit, and watches the cluster finish the job on its own.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from scriptorium.core.errors import SpecError
from scriptorium.jobs.cli import build_parser
from scriptorium.jobs.submit import prepare_submission
from tests.conftest import free_port, make_image, one_line_error, read_rows, run_cli
from tests.local_cluster import LocalCluster


def write_spec(path: Path, inputs: Path, output: Path, model: Path, run_id: str = "") -> Path:
    path.write_text(f"""
{f'run_id = "{run_id}"' if run_id else ''}
[input]
uri = "{inputs}"
[output]
uri = "{output}/run_id={{run_id}}"
[model]
id = "{model}"
device = "cpu"
[[tasks]]
kind = "caption"
max_new_tokens = 4
""")
    return path


def submit_args(*argv: str):
    return build_parser().parse_args(["submit", *argv])


def fresh_dir(parent: Path) -> str:
    """An empty folder for prepare_submission to lay the upload out in (`submit` uses a temp dir)."""
    path = parent / f"upload-{len(list(parent.glob('upload-*')))}"
    path.mkdir()
    return str(path)


# -- what would be submitted (no cluster needed) ------------------------------------------------------

def test_submission_runs_the_spec_on_the_cluster_with_a_fixed_run_id(tmp_path):
    spec = write_spec(tmp_path / "caption.toml", tmp_path / "in", tmp_path / "out", tmp_path / "model")
    upload = Path(fresh_dir(tmp_path))
    args = submit_args("--job", str(spec), "--run-id", "corpus-7", "--env", "HF_HOME=/cache", "--",
                       "--replicas", "4", "--batch-size", "16")
    submission = prepare_submission(args, str(upload))

    assert shlex.split(submission.entrypoint) == [
        "scriptorium", "run", "--job", "caption.toml", "--run-id", "corpus-7", "--address", "auto",
        "--replicas", "4", "--batch-size", "16",
    ]
    # The spec travels with the job: it is the only file uploaded, at the path the entrypoint names.
    assert submission.runtime_env == {"working_dir": str(upload), "env_vars": {"HF_HOME": "/cache"}}
    assert [p.name for p in upload.iterdir()] == ["caption.toml"]
    assert submission.submission_id.startswith("scriptorium-corpus-7-")


def test_run_id_comes_from_the_spec_or_is_made_once_on_the_laptop(tmp_path):
    named = write_spec(tmp_path / "named.toml", tmp_path, tmp_path, tmp_path, run_id="archive")
    assert prepare_submission(submit_args("--job", str(named)), fresh_dir(tmp_path)).run_id == "archive"
    # Without one, the id is made here and passed on, so a resubmission can name the same run.
    anonymous = write_spec(tmp_path / "anon.toml", tmp_path, tmp_path, tmp_path)
    submission = prepare_submission(submit_args("--job", str(anonymous)), fresh_dir(tmp_path))
    assert submission.run_id
    assert shlex.split(submission.entrypoint)[4:6] == ["--run-id", submission.run_id]


def test_working_dir_upload_names_the_spec_by_its_path_inside_it(tmp_path):
    (tmp_path / "project" / "jobs").mkdir(parents=True)
    spec = write_spec(tmp_path / "project" / "jobs" / "qa.toml", tmp_path, tmp_path, tmp_path, run_id="qa")
    args = submit_args("--job", str(spec), "--working-dir", str(tmp_path / "project"))
    submission = prepare_submission(args, fresh_dir(tmp_path))
    assert submission.working_dir == str(tmp_path / "project")
    assert "--job jobs/qa.toml" in submission.entrypoint

    elsewhere = write_spec(tmp_path / "qa.toml", tmp_path, tmp_path, tmp_path, run_id="qa")
    with pytest.raises(SpecError, match="inside --working-dir"):
        prepare_submission(submit_args("--job", str(elsewhere), "--working-dir", str(tmp_path / "project")),
                           fresh_dir(tmp_path))


@pytest.mark.slow
def test_a_bad_spec_fails_on_the_laptop_before_anything_is_sent(tmp_path):
    spec = tmp_path / "typo.toml"
    spec.write_text('[input]\nuri = "s3://b/in"\n[output]\nuri = "s3://b/out"\n[model]\nid = "a/b"\ndevice = "tpu"\n'
                    '[[tasks]]\nkind = "ocr"\n')
    # No cluster is listening at this address: the error must come from the spec check, not a connection.
    done = run_cli("submit", "--address", "http://127.0.0.1:9", "--job", str(spec))
    assert done.returncode == 2
    assert "model.device = 'tpu'" in done.stderr
    done = run_cli("submit", "--address", "http://127.0.0.1:9", "--job", str(tmp_path / "missing.toml"))
    assert done.returncode == 2 and "does not exist" in done.stderr


@pytest.mark.slow
def test_an_unreachable_cluster_is_one_line_naming_the_address(tmp_path):
    spec = write_spec(tmp_path / "ok.toml", tmp_path, tmp_path, tmp_path, run_id="r1")
    done = run_cli("submit", "--address", f"http://127.0.0.1:{free_port()}", "--job", str(spec))
    assert done.returncode == 2
    assert "cannot submit to the Ray cluster at http://127.0.0.1:" in done.stderr


@pytest.mark.slow
def test_a_ray_client_address_is_refused_with_the_way_that_works(tmp_path):
    # Ray Data cannot run through Ray Client; the job must be driven from inside the cluster.
    spec = write_spec(tmp_path / "ok.toml", tmp_path, tmp_path / "out", tmp_path, run_id="r1")
    done = run_cli("run", "--job", str(spec), "--address", "ray://127.0.0.1:10001")
    assert done.returncode == 2
    assert "Ray Client" in done.stderr and "scriptorium submit --address http://HEAD:8265" in done.stderr


# -- against a real Ray head with the Jobs API ------------------------------------------------------------

@pytest.mark.slow
def test_submitted_job_finishes_on_the_cluster_after_the_laptop_left(tmp_path, tiny_model):
    from ray.job_submission import JobStatus, JobSubmissionClient

    inputs = tmp_path / "corpus"
    inputs.mkdir()
    for i in range(3):
        make_image(inputs / f"img-{i}.png", color=(80 * i, 60, 90))
    output = tmp_path / "captions"
    spec = write_spec(tmp_path / "caption.toml", inputs, output, tiny_model)
    head = dict(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                dashboard_port=free_port(), dashboard_agent_listen_port=free_port())

    with LocalCluster(head=head, workers=[]) as cluster:
        done = run_cli("submit", "--address", cluster.dashboard, "--job", str(spec), "--run-id", "corpus-1",
                       env=cluster.env)
        # The CLI returned: it printed the submission and how to follow it, and holds nothing open.
        assert done.returncode == 0, done.stderr[-2000:]
        submission_id = done.stdout.split()[1]
        assert f"ray job logs --address {cluster.dashboard} --follow {submission_id}" in done.stdout

        client = JobSubmissionClient(cluster.dashboard)
        deadline = time.monotonic() + 240
        while client.get_job_status(submission_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-3000:]
            time.sleep(0.5)
        assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, client.get_job_logs(submission_id)[-3000:]
        assert client.get_job_info(submission_id).metadata["scriptorium_run_id"] == "corpus-1"

        rows = read_rows(output / "run_id=corpus-1")
        assert sorted(r["source_uri"] for r in rows) == sorted(str(p) for p in inputs.iterdir())
        assert {(r["status"], r["task"], r["run_id"]) for r in rows} == {("ok", "caption", "corpus-1")}

        # Submitting the same run again with --wait follows it to the end and resumes: nothing is redone.
        again = run_cli("submit", "--address", cluster.dashboard, "--job", str(spec), "--run-id", "corpus-1",
                        "--wait", env=cluster.env)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
        assert f"job {again.stdout.split()[1]}: SUCCEEDED" in again.stdout
        assert pads.dataset(output / "run_id=corpus-1", format="parquet").count_rows() == len(rows)


@pytest.mark.slow
def test_a_head_with_token_auth_refuses_a_submission_without_the_token_and_runs_one_with_it(tmp_path, tiny_model):
    from ray.job_submission import JobSubmissionClient

    inputs = tmp_path / "corpus"
    inputs.mkdir()
    make_image(inputs / "img-0.png", color=(10, 60, 90))
    output = tmp_path / "captions"
    spec = write_spec(tmp_path / "caption.toml", inputs, output, tiny_model)
    token = "5c0ff3e" + "ab" * 14  # made up for the test; it must show up nowhere
    head = dict(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                dashboard_port=free_port(), dashboard_agent_listen_port=free_port())
    cluster = LocalCluster(head=head, workers=[])
    cluster.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # the head is started as the configs do
    laptop = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}

    with cluster:
        refused = run_cli("submit", "--address", cluster.dashboard, "--job", str(spec), env=laptop)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "--auth-token-file" in one_line_error(refused, "token authentication")

        token_file = tmp_path / "ray-token"
        token_file.write_text(token + "\n")
        done = run_cli("submit", "--address", cluster.dashboard, "--job", str(spec), "--run-id", "secure-1",
                       "--auth-token-file", str(token_file), "--wait", env=laptop)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert [r["status"] for r in read_rows(output / "run_id=secure-1")] == ["ok"]

        client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {token}"})
        logs = client.get_job_logs(done.stdout.split()[1])
        summaries = "".join(p.read_text(errors="replace") for p in output.rglob("*") if p.suffix in {".json", ".txt"})
        for text in (refused.stdout, refused.stderr, done.stdout, done.stderr, logs, summaries):
            assert token not in text
