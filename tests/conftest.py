"""Shared fixtures: a tiny random-weight Idefics2 checkpoint, a local Ray, and document factories; and the
hooks that order the tests over pytest-xdist's workers and keep processes out of the fast tier.

Tests use the real pieces: a real checkpoint saved with save_pretrained and loaded by from_pretrained,
a real Ray runtime, real PDFs made with PyMuPDF and real images made with Pillow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]


# -- the order of `make test` ----------------------------------------------------------------------------
# `make test` runs two pytest-xdist workers with `--dist loadgroup`, scheduled by the hooks below:
# - the tests of a module that uses a module-scoped fixture (a whole run, a server, a browser) go to one
#   worker together, as one unit: two workers would each make the fixture again;
# - every other test is a unit of its own;
# - units go to whichever worker is free, the longest first: a long unit begun last would leave the other
#   worker idle at the end. A unit takes what its tests took the last time they passed, recorded in
#   pytest's cache (.pytest_cache) at the end of every run; a test with no record there (a fresh clone, a
#   new test) counts UNTIMED_S, so the slow tests go first, the modules with more of them first.
# The workers do the sorting, with the same records (pytest_configure_node hands the controller's to
# them), and tell the controller the units in a file: it sees nothing of the tests but their ids.
# (pytest-xdist's own `xdist_group` marks do nothing under pytest 9: the worker renames `item._nodeid`,
# which pytest 9 no longer reads.)
DURATIONS = "scriptorium/durations"  # the cache's {test id: seconds} of each test's last passing run
UNTIMED_S = {"slow": 30.0, "fast": 1.0}
TO_WORKERS = pytest.StashKey[dict]()


class Durations:
    """Records how long each test took, setup and teardown included, into the cache at the end of the run.
    Runs where the reports arrive: the one pytest process, or the controller of the xdist workers."""

    def __init__(self, cache):
        self.cache, self.seconds, self.failed = cache, {}, set()

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        if report.failed:  # it stopped early: its time says nothing of the next run's
            self.failed.add(report.nodeid)

    def pytest_sessionfinish(self):
        known = self.cache.get(DURATIONS, {})
        known.update({test: round(s, 2) for test, s in self.seconds.items() if test not in self.failed})
        self.cache.set(DURATIONS, known)


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # The workers share the machine's cores, where torch would give each of them all the cores: the
        # tiny model's small matrices then cost more in handing work between threads than in computing.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workerinput["workercount"]))
    elif getattr(config, "cache", None) is not None:
        config.pluginmanager.register(Durations(config.cache), "scriptorium-durations")


@pytest.hookimpl(optionalhook=True)  # hooks of pytest-xdist: unknown without it (-p no:xdist)
def pytest_configure_node(node):
    """Each worker gets the same records (read once: the workers must sort alike) and where to put the units."""
    config = node.config
    if TO_WORKERS not in config.stash:
        cache = getattr(config, "cache", None)
        config.stash[TO_WORKERS] = {
            "scriptorium_durations": cache.get(DURATIONS, {}) if cache is not None else {},
            "scriptorium_units": str(Path(tempfile.mkdtemp(prefix="scriptorium-units-")) / "units.json"),
        }
    node.workerinput.update(config.stash[TO_WORKERS])


def pytest_unconfigure(config):
    if TO_WORKERS in config.stash:
        shutil.rmtree(Path(config.stash[TO_WORKERS]["scriptorium_units"]).parent, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected and pytest has grouped fixture parameters
def pytest_collection_modifyitems(config, items):
    """In an xdist worker: the tests in units, the longest unit first; the units go to the controller."""
    if "scriptorium_units" not in getattr(config, "workerinput", {}):
        return
    known = config.workerinput["scriptorium_durations"]
    shared = {module_of(item) for item in items if uses_a_module_fixture(item)}
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(module_of(item) if module_of(item) in shared else item.nodeid, []).append(item)

    def seconds(item):
        return known.get(item.nodeid, UNTIMED_S["slow" if item.get_closest_marker("slow") else "fast"])

    ordered = sorted(units.items(), key=lambda unit: -sum(map(seconds, unit[1])))  # stable: ties keep their order
    items[:] = [item for _, tests in ordered for item in tests]
    path = Path(config.workerinput["scriptorium_units"])
    written = path.with_name(f"{config.workerinput['workerid']}.json")
    written.write_text(json.dumps({item.nodeid: unit for unit, tests in ordered for item in tests}))
    os.replace(written, path)  # both workers write the same units; a reader sees one whole file


def module_of(item) -> str:
    return item.nodeid.split("::", 1)[0]


def uses_a_module_fixture(item) -> bool:
    return any(defs[-1].scope in ("class", "module") for defs in item._fixtureinfo.name2fixturedefs.values())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: the workers' units, handed out in the workers' order as workers free up."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # (pytest-xdist 3.6) else it puts the units with the most tests first

    class UnitScheduling(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:  # first asked once every worker has collected, so has written the file
                path = Path(config.stash[TO_WORKERS]["scriptorium_units"])
                self.units = json.loads(path.read_text()) if path.exists() else {}
            return self.units.get(nodeid, nodeid)

    return UnitScheduling(config, log)


# -- the fast tier ----------------------------------------------------------------------------------------
# `make test-fast` runs the tests not marked `slow` (`-m "not slow"`). A test is slow when it starts a
# process: Ray (a local runtime or a cluster), a storage server, a browser, `scriptorium` on the command
# line. Every unmarked test runs with process starts refused, so one that lacks the mark fails at once,
# saying so, instead of quietly making the fast tier slow. Refused at `subprocess.Popen.__init__`, which
# subprocess.run, Ray's own node processes and asyncio's all go through. The render sandbox's child is let
# through: every page is rendered in one, started once per thread and kept.
RENDERER = "scriptorium.pipeline.render.sandbox"
REFUSED = pytest.StashKey[list]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("slow"):
        return (yield)
    refused = item.stash[REFUSED] = []
    start = subprocess.Popen.__init__

    def refuse(popen, args, *rest, **options):
        command = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if RENDERER in map(str, command):
            return start(popen, args, *rest, **options)
        refused.append(f"{item.nodeid} starts a process ({' '.join(map(str, command))[:200]}) but is not "
                       "marked slow: mark it @pytest.mark.slow (a whole module: pytestmark = pytest.mark.slow)")
        pytest.fail(refused[-1], pytrace=False)

    subprocess.Popen.__init__ = refuse
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A refused start fails its test even where the code under test caught the failure and went on."""
    report = yield
    refused = item.stash.get(REFUSED, [])
    if refused and report.passed:
        report.outcome, report.longrepr = "failed", refused[0]
    refused.clear()
    return report


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Idefics2 checkpoint without image splitting (fast)."""
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_split(tmp_path_factory) -> Path:
    """The same architecture with `do_image_splitting=True` in its processor config."""
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny-split", do_image_splitting=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_pdf(path: Path, pages: list[str], size=(595, 842)) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_textbox(pymupdf.Rect(40, 40, size[0] - 40, size[1] - 40), text, fontsize=14)
    doc.save(str(path))
    return path


def make_scan_pdf(path: Path, dpi: int, size=(612, 792), text: str = "A scanned page.",
                  ocr_layer: str = "", visible_text: str = "") -> Path:
    """A one-page PDF as a scanner makes it: one raster image at `dpi` covering the page (Letter by
    default), a picture of `text`; optionally an invisible OCR text layer, or visible text on top."""
    import io

    import pymupdf

    pixels = (round(size[0] * dpi / 72), round(size[1] * dpi / 72))
    scan = io.BytesIO()
    draw_image(pixels, (90, 90, 90), text).save(scan, format="PNG")
    doc = pymupdf.open()
    page = doc.new_page(width=size[0], height=size[1])
    page.insert_image(page.rect, stream=scan.getvalue())
    if ocr_layer:
        page.insert_text((40, 60), ocr_layer, render_mode=3)  # invisible, as OCR tools lay it
    if visible_text:
        page.insert_text((40, 60), visible_text)
    doc.save(str(path))
    return path


def draw_image(size, color, text):
    """A white RGB picture with a `color` rectangle in its top-left quarter and `text` below it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, size[0] // 2, size[1] // 2], fill=color)
    draw.text((12, size[1] // 2 + 10), text, fill="black")
    return image


def make_image(path: Path, size=(320, 240), color=(30, 120, 200), text="hello") -> Path:
    draw_image(size, color, text).save(path)
    return path


def read_rows(folder, filesystem=None, empty_ok: bool = False) -> list[dict]:
    """Every row of the Parquet dataset in `folder`, as any reader sees it. `empty_ok`: [] for a local
    folder with no Parquet file yet (a run still starting), where pyarrow would raise."""
    import pyarrow.dataset as pads

    if empty_ok and not any(Path(folder).glob("*.parquet")):
        return []
    return pads.dataset(str(folder) if filesystem is None else folder, filesystem=filesystem,
                        format="parquet").to_table().to_pylist()


def driver_job_toml(rows_per_file: int) -> str:
    """The [render]/[model]/[resources]/[output] sections of a job file for `scriptorium run` drivers
    in tests: small pages on CPU, small batches, a file published every `rows_per_file` rows."""
    return f"""
[render]
page_edge = 64
[model]
longest_edge = 56
shortest_edge = 28
device = "cpu"
[resources]
batch_size = 2
[output]
rows_per_file = {rows_per_file}
"""


def small_ocr_job(input_uri, output_uri, model, max_new_tokens: int = 4) -> dict:
    """A job spec dict for a quick OCR run on CPU: small renders, small model inputs, batches of 4."""
    return {
        "input": {"uri": str(input_uri)},
        "output": {"uri": str(output_uri)},
        "model": {"id": str(model), "device": "cpu", "longest_edge": 56, "shortest_edge": 28},
        "render": {"page_edge": 64},
        "tasks": [{"kind": "ocr", "max_new_tokens": max_new_tokens}],
        "resources": {"batch_size": 4},
    }


def plan_row(path: Path, questions: list[str] | None = None, done_pages: list[int] | None = None) -> dict:
    """A planned input, as the lister (and the manifest reader, for `questions`) makes it."""
    from scriptorium.core.kinds import kind_of

    return {"source_uri": str(path), "size": path.stat().st_size, "etag": "test", "kind": kind_of(path.name),
            "questions": questions, "done_pages": done_pages}


def job(model, tasks=(), **sections):
    """A job spec for in-process runs on CPU in fp32 (the tiny checkpoint): `sections` are spec sections."""
    from scriptorium.core.spec import JobSpec, ModelSpec

    return JobSpec(model=ModelSpec(id=str(model), device="cpu", dtype="fp32"), tasks=list(tasks), run_id="test",
                   **sections)


def run_stages(spec, plan_rows: list[dict], registry=None) -> list[dict]:
    """The result rows of `spec` over `plan_rows`, through the job's own stages run in-process
    (pipeline/local.py), sorted by (source, page, task, question)."""
    from scriptorium.pipeline.local import run_in_process

    rows = run_in_process(spec, plan_rows, dedup_registry=registry).to_pylist()
    return sorted(rows, key=lambda r: (r["source_uri"], r["page"], r["task"], r["question"] or ""))


def preprocessed(spec, plan_rows: list[dict]):
    """Page rows of `plan_rows` as the model stage receives them: the job's stages up to preprocessing."""
    import pyarrow as pa

    from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
    from scriptorium.pipeline.local import walk
    from scriptorium.pipeline.stages import derive, job_stages, stages_until

    before_model = stages_until(job_stages(spec, derive(spec)), "preprocess")
    return pa.concat_tables(walk(before_model, [table_from_rows(plan_rows, PLAN_SCHEMA)]))


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `scriptorium ARGS` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "scriptorium.jobs.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single `scriptorium: error:` line of a failed command, after checking there is nothing else."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("scriptorium: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    """A loopback port nothing listens on (free when this returns)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3 API on loopback. Tests always pass `endpoint` explicitly: nothing reaches a cloud."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def new_bucket(self, stem: str = "bkt") -> str:
        import uuid

        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes | Path) -> None:
        body = data.read_bytes() if isinstance(data, Path) else data
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def filesystem(self):
        """An s3fs filesystem on this server (pyarrow wants its paths without `s3://`)."""
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)


FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIASCRIPTORIUMTEST0",
    "AWS_SECRET_ACCESS_KEY": "scriptorium-session-fake-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def fake_aws_credentials():
    """Fake credentials and no AWS config files, for the whole session (and the CLIs it starts)."""
    saved = {name: os.environ.get(name) for name in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(fake_aws_credentials, tmp_path_factory):
    """A real S3 server, SeaweedFS, on 127.0.0.1 (tests/seaweedfs.py): S3's semantics, conditional
    writes included. Killed at the end of the session, with nothing left behind."""
    from tests.seaweedfs import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield S3Server(endpoint)


@pytest.fixture(scope="session")
def moto_server(fake_aws_credentials):
    """moto's S3 and IAM on 127.0.0.1, for the tests that inject faults SeaweedFS cannot: access denied
    by an IAM policy (moto checks policies once asked to, see tests/test_storage_s3.py)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


class StoreProxy:
    """A loopback HTTP proxy in front of a store that records each request and can answer the next
    ones with an injected failure (throttling, 5xx), the way a busy S3 endpoint would. `drop_headers`
    are removed from every request (a store that ignores them, such as conditions)."""

    def __init__(self, target: str, drop_headers: tuple[str, ...] = ()):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.failures: list[tuple[int, bytes]] = []  # answered in order, one per request, before forwarding
        target_url = urlparse(target)
        dropped = {name.lower() for name in drop_headers}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path))
                headers: list[tuple[str, str]] = []
                if proxy.failures:
                    status, payload = proxy.failures.pop(0)
                else:
                    upstream = http.client.HTTPConnection(target_url.hostname, target_url.port, timeout=30)
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                    upstream.request(self.command, self.path, body=body, headers=forwarded)
                    response = upstream.getresponse()
                    status, payload, headers = response.status, response.read(), response.getheaders()
                    upstream.close()
                self.send_response(status)
                for name, value in headers:  # a HEAD answer keeps the object's Content-Length
                    if name.lower() not in ("transfer-encoding", "connection", "server", "date", "content-length") \
                            or (name.lower() == "content-length" and self.command == "HEAD"):
                        self.send_header(name, value)
                if self.command != "HEAD" or not headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StoreProxy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@pytest.fixture
def model_inputs(monkeypatch):
    """What the model stage passes to `generate` (recorded, then generated as usual)."""
    from transformers import Idefics2ForConditionalGeneration

    calls, generate = [], Idefics2ForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        calls.append(kwargs)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Idefics2ForConditionalGeneration, "generate", recording_generate)
    return calls
