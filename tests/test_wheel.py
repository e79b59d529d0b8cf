"""The package as a cluster image or a user gets it: a wheel, installed into a fresh virtual environment
outside the checkout, that imports as `scriptorium` and nothing else and runs a job from another folder.

The fresh environment reuses this one's installed dependencies (torch, Ray, ...) through a path file, so
the test takes seconds instead of a download; that path file adds the folder only, so this environment's
editable install of the checkout is not seen there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FOLDERS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {"scriptorium.core": "core", ...}


def run(*command, **options) -> subprocess.CompletedProcess:
    """`command` in an environment without PYTHONPATH: what the fresh venv imports is its own alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, env=env, **options)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the files cluster/Dockerfile copies, as its first stage builds it."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in FOLDERS.values():
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, source)
    (built,) = dist.glob("scriptorium-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed and this environment's dependencies visible."""
    env = tmp_path_factory.mktemp("env") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env)
    site = Path(run(env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                .stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--quiet", "--no-deps",
        "--no-index", wheel)
    return env


def test_the_wheel_holds_scriptorium_alone_with_every_subpackage_its_job_specs_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    (metadata,) = top_level - {"scriptorium"}
    assert metadata.endswith(".dist-info"), top_level
    packaged = {os.path.dirname(name) for name in names if name.endswith("/__init__.py")}
    in_checkout = {
        "scriptorium/" + str(init.parent.relative_to(REPO))
        for folder in FOLDERS.values() for init in (REPO / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert packaged == in_checkout, "a subpackage is missing from pyproject.toml's packages list"
    data_files = [*(REPO / "jobs").glob("*.toml"), *(REPO / "jobs" / "templates").iterdir()]
    missing = {f"scriptorium/{p.relative_to(REPO).as_posix()}" for p in data_files} - set(names)
    assert not missing, "data files missing from the wheel (pyproject.toml's package-data)"


def test_the_installed_wheel_makes_the_tiny_model_runs_a_job_and_reports_it_from_another_folder(fresh_env, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, scriptorium = fresh_env / "bin" / "python", fresh_env / "bin" / "scriptorium"
    where = run(python, "-c", "import scriptorium.pipeline.stages as m; print(m.__file__)", cwd=elsewhere).stdout
    assert where.startswith(str(fresh_env)), where

    run(scriptorium, "tiny-model", "model", cwd=elsewhere)
    (elsewhere / "pages").mkdir()
    for sample in ("memo.pdf", "receipt.png"):
        shutil.copy(REPO / "samples" / sample, elsewhere / "pages" / sample)
    (elsewhere / "job.toml").write_text(
        'run_id = "wheel"\n[input]\nuri = "pages"\n[output]\nuri = "out"\n'
        '[model]\nid = "model"\ndevice = "cpu"\ndtype = "fp32"\n'
        '[[tasks]]\nkind = "caption"\nmax_new_tokens = 4\n'
    )
    done = run(scriptorium, "run", "--job", "job.toml", cwd=elsewhere)
    import pyarrow.dataset as ds

    rows = ds.dataset(elsewhere / "out", format="parquet").to_table(columns=["source_uri", "status"]).to_pylist()
    assert {Path(r["source_uri"]).name for r in rows} == {"memo.pdf", "receipt.png"}, done.stdout[-2000:]
    assert {r["status"] for r in rows} == {"ok"}

    run(scriptorium, "report", "out", "--html", "review.html", cwd=elsewhere)  # its template, from the wheel
    assert (elsewhere / "review.html").read_text().count('<section class="page"') == 2  # memo.pdf's page, the receipt
