"""The SCRIPTORIUM_* environment variables reach a run through its spec, and only through it: `scriptorium
run` reads them into `[resources]`, and the runner and the stages see only the spec."""

from __future__ import annotations

import re

import pytest

from scriptorium.core.spec import ResourceSpec
from scriptorium.jobs.arguments import spec_from_args
from scriptorium.jobs.cli import build_parser
from tests.conftest import REPO

ENVIRONMENT_READ = re.compile(r"""(environ\s*(\.get\(|\[)|getenv\()\s*["']SCRIPTORIUM_""")


def run_spec(environ: dict, *flags: str):
    return spec_from_args(build_parser().parse_args(["run", *flags]), environ)


def test_scriptorium_ray_address_reaches_the_spec_unless_the_job_sets_an_address(tmp_path):
    environ = {"SCRIPTORIUM_RAY_ADDRESS": "10.0.0.1:6379"}
    assert run_spec(environ).resources.address == "10.0.0.1:6379"
    assert run_spec(environ, "--address", "auto").resources.address == "auto"
    job = tmp_path / "job.toml"
    job.write_text('[resources]\naddress = "head:6379"\n')
    assert run_spec(environ, "--job", str(job)).resources.address == "head:6379"
    assert run_spec({}).resources.address == ""


def test_scriptorium_ray_progress_reaches_the_spec(tmp_path):
    assert run_spec({"SCRIPTORIUM_RAY_PROGRESS": "1"}).resources.ray_progress is True
    assert run_spec({"SCRIPTORIUM_RAY_PROGRESS": "0"}).resources.ray_progress is False
    assert run_spec({}).resources.ray_progress is False
    job = tmp_path / "job.toml"
    job.write_text("[resources]\nray_progress = true\n")
    assert run_spec({}, "--job", str(job)).resources.ray_progress is True


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # a new DataContext sets settings Ray Data deprecates
@pytest.mark.parametrize("ray_progress", [False, True])
def test_ray_progress_keeps_ray_datas_progress_bars(ray_progress):
    import ray.data

    from scriptorium.jobs.ray_setup import tune_ray_data

    ctx = ray.data.DataContext()  # a context of its own, not the process's current one
    ctx.enable_progress_bars = ctx.print_on_execution_start = True
    tune_ray_data(ctx, ResourceSpec(ray_progress=ray_progress))
    assert ctx.enable_progress_bars is ray_progress and ctx.print_on_execution_start is ray_progress
    assert ctx.max_errored_blocks == 0 and ctx.execution_options.preserve_order is False


def test_only_the_spec_reads_scriptorium_variables():
    readers = sorted(str(path.relative_to(REPO)) for folder in ("core", "connectors", "pipeline", "jobs")
                     for path in (REPO / folder).rglob("*.py") if ENVIRONMENT_READ.search(path.read_text()))
    assert readers == ["core/spec.py"]
