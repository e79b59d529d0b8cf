"""`scriptorium submit`: run a job on a Ray cluster through the Ray Jobs API; the laptop can go away.

    scriptorium submit --address http://HEAD:8265 --job jobs/digitize_archive.toml [--run-id ID] \
                       [--wait] [-- RUN FLAGS...]

What happens:
  1. The spec (plus any RUN FLAGS after `--`) is loaded and validated here, so a typo fails on the
     laptop in a second, not on the cluster an hour later.
  2. The run id is fixed here (the spec's, `--run-id`, or a new one), so the submission, the output
     partition (`{run_id}` in `[output] uri`) and a later resume all carry the same name.
  3. The spec file travels with the job as its runtime_env `working_dir` (just the spec, or `--working-dir`
     when the spec refers to files next to it), and the cluster runs
     `scriptorium run --job SPEC --run-id ID --address auto [RUN FLAGS]` on the head node, where
     `auto` joins the cluster the job runs in. The job belongs to the cluster from then on.
  4. The submission id is printed with the commands to follow, check and stop the job.

Exit status: 0 when submitted (with --wait: when the job succeeded), 1 with --wait when the job failed
or was stopped, 2 when the spec is unusable or the cluster cannot be reached. `--env` values (tokens,
say) go to the cluster only; they are never printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import check_run_id, new_run_id
from scriptorium.jobs.arguments import add_run_arguments, spec_from_args

TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard / Jobs API, e.g. http://HEAD:8265 "
                                     "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--job", required=True, help="TOML job spec to run")
    p.add_argument("--run-id", help="name of the run (default: the spec's run_id, else a new one); "
                                    "submit the same id again to resume it")
    p.add_argument("--working-dir", help="upload this folder with the job (it must contain the spec); "
                                         "default: upload the spec file alone")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job on the cluster (repeatable)")
    p.add_argument("--auth-token-file", metavar="PATH",
                   help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                        "else $RAY_AUTH_TOKEN_PATH); the token is sent, never printed")
    p.add_argument("--submission-id", help="Ray submission id (default: scriptorium-RUN_ID-XXXX)")
    p.add_argument("--wait", action="store_true",
                   help="stay attached: print the job's logs and exit 0 only if it succeeds")
    p.add_argument("--poll-s", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("run_flags", nargs=argparse.REMAINDER,
                   help="after `--`: flags for `scriptorium run` on the cluster (e.g. -- --replicas 8)")


@dataclass
class Submission:
    """Everything sent to the Jobs API, built and checked before anything is sent."""

    run_id: str
    entrypoint: str
    working_dir: str
    env_vars: dict[str, str] = field(default_factory=dict)
    submission_id: str = ""

    @property
    def runtime_env(self) -> dict:
        env = {"working_dir": self.working_dir}
        if self.env_vars:
            env["env_vars"] = self.env_vars
        return env


def prepare_submission(args: argparse.Namespace, upload_dir: str) -> Submission:
    """Check the spec as the cluster will run it; lay out the upload; build the entrypoint."""
    run_flags = list(args.run_flags or [])
    if run_flags[:1] == ["--"]:
        run_flags = run_flags[1:]
    job = Path(args.job)
    if not job.is_file():
        raise SpecError(f"job spec {job} does not exist")

    # Validate exactly what the cluster will run: the spec with the forwarded flags applied.
    run_parser = argparse.ArgumentParser(prog="scriptorium run")
    add_run_arguments(run_parser)
    spec = spec_from_args(run_parser.parse_args(["--job", str(job), *run_flags]))
    run_id = check_run_id(args.run_id or spec.run_id or new_run_id())
    spec.updated(run_id=run_id).check_runnable()
    env_vars = parse_env(args.env)

    # The upload: the spec alone, or the given folder with the spec inside it.
    if args.working_dir:
        root = Path(args.working_dir).resolve()
        if not root.is_dir():
            raise SpecError(f"--working-dir {args.working_dir} is not a folder")
        try:
            spec_path = job.resolve().relative_to(root).as_posix()
        except ValueError:
            raise SpecError(f"the job spec {job} must be inside --working-dir {args.working_dir}") from None
        working_dir = str(root)
    else:
        spec_path = job.name
        shutil.copyfile(job, Path(upload_dir) / spec_path)
        working_dir = upload_dir

    entrypoint = shlex.join(
        ["scriptorium", "run", "--job", spec_path, "--run-id", run_id, "--address", "auto", *run_flags]
    )
    return Submission(
        run_id=run_id,
        entrypoint=entrypoint,
        working_dir=working_dir,
        env_vars=env_vars,
        submission_id=args.submission_id or f"scriptorium-{run_id}-{uuid.uuid4().hex[:6]}",
    )


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--env {pair!r} must look like KEY=VALUE")
        env[key] = value
    return env


def auth_headers(token_file: str | None) -> dict[str, str]:
    """The Authorization header for a head started with RAY_AUTH_MODE=token, or none when no token is
    given. Sent explicitly so that the submitting machine needs no Ray auth setting of its own."""
    path = token_file or (None if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SpecError(f"cannot read the Ray auth token file {path}: {exc.strerror}") from None
    else:
        token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    upload_dir = tempfile.mkdtemp(prefix="scriptorium-submit-")
    try:
        submission = prepare_submission(args, upload_dir)
        try:
            client = JobSubmissionClient(args.address, headers=auth_headers(args.auth_token_file))
            submission_id = client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env,
                submission_id=submission.submission_id,
                metadata={"scriptorium_run_id": submission.run_id, "job_spec": Path(args.job).name},
            )
        except AuthenticationError:  # its message would repeat the server's body; say what to do instead
            raise SpecError("the Ray cluster refused the submission (401/403): it requires token authentication; "
                            "set RAY_AUTH_TOKEN or pass --auth-token-file with the cluster's token") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "auto"
            raise SpecError(f"cannot submit to the Ray cluster at {where}: {str(exc).splitlines()[0][:300]}. "
                            "Pass --address http://HEAD:8265 (the dashboard port, e.g. through "
                            "`ray dashboard cluster.yaml` or `kubectl port-forward svc/HEAD-svc 8265`)") from None
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)

    address = f" --address {shlex.quote(args.address)}" if args.address else ""
    print(f"submitted {submission_id} (run {submission.run_id})\n"
          f"  runs:    {submission.entrypoint}\n"
          f"  follow:  ray job logs{address} --follow {submission_id}\n"
          f"  status:  ray job status{address} {submission_id}\n"
          f"  stop:    ray job stop{address} {submission_id}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return wait_for(client, submission_id, args.poll_s)


def wait_for(client, submission_id: str, poll_s: float) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded, 1 otherwise."""
    import asyncio

    async def stream_logs():
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream_logs())  # returns when the job ends
    except Exception as exc:  # a dropped connection must not abandon the wait: fall back to polling
        print(f"scriptorium: log stream interrupted ({type(exc).__name__}: {exc}); waiting for the job",
              file=sys.stderr)
    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL_STATES:
        time.sleep(poll_s)
    print(f"job {submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
