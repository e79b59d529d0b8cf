"""The application metrics reach Prometheus the way they do on a cluster, and say what the job did.

A real Ray head (tests/local_cluster.py) exports its metrics on a port (`metrics_export_port`, as
`ray start --metrics-export-port` does), `scriptorium run --address` runs a job on it (the driver ends,
the cluster and its metrics agent stay up), and a real Prometheus (Debian's `prometheus`, which `make
test` installs; skipped where it is missing) on loopback scrapes that port. Then PromQL, against that
server: the rows counters equal the rows the job wrote, by task and status; and every query of the
Grafana dashboard (cluster/grafana-dashboard.json) returns data, but Ray's GPU metrics, which a node
without a GPU does not have: for those the query is checked to be valid PromQL, and to have nothing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_pdf, read_rows, run_cli
from tests.local_cluster import LocalCluster

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make test installs it: "
                                                  "apt-get install -y prometheus)"),
]

DASHBOARD = REPO / "cluster" / "grafana-dashboard.json"
RUN_ID = "metrics-test"
GPU_METRICS = ("ray_node_gpus_", "ray_node_gram_")  # Ray's own, exported only by nodes with a GPU
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval for a 1 s scrape interval and a 1 s step is 4 s; a little more


class Prometheus:
    """A Prometheus server on loopback scraping `targets` every second, with its data in a temp folder."""

    def __init__(self, targets: list[str]):
        self.folder = tempfile.mkdtemp(prefix="prometheus-")
        self.port = free_port()
        config = Path(self.folder, "prometheus.yml")
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(Path(self.folder, "prometheus.log"), "w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.folder}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = Path(self.folder, "prometheus.log").read_text()
                raise RuntimeError(f"prometheus did not start: {log[-2000:]}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the reason in the body
            return json.load(exc)

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        """What Grafana asks for a time-series panel: `expr` at every second from `start` to `end`."""
        answer = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def by(self, expr: str, *labels: str) -> dict[tuple, float]:
        return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in self.query(expr)}

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_for(check, what: str, timeout: float = 180):
    """Poll `check()` until it returns something true (Ray's workers report metrics every few seconds,
    and Prometheus scrapes every second): its value, or fail naming `what` and the last value seen."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1)
    pytest.fail(f"{what}: not seen within {timeout} s (last: {last})")


def write_job(tmp: Path, model: Path) -> tuple[Path, Path]:
    """A job of two tasks over born-digital PDFs (OCR from the text layer, captions from the model), a
    copy of one of them (dedup's hits) and a file that is not a PDF (error rows)."""
    inputs = tmp / "in"
    inputs.mkdir()
    make_pdf(inputs / "a.pdf", ["The first page of a report, with enough text for its text layer."] * 3)
    make_pdf(inputs / "b.pdf", ["Another document: its one page has a text layer as well, long enough."])
    shutil.copy(inputs / "b.pdf", inputs / "b-copy.pdf")
    (inputs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF at all")
    out = tmp / "out"
    job = tmp / "job.toml"
    job.write_text(f"""
run_id = "{RUN_ID}"
[input]
uri = "{inputs}"
[output]
uri = "{out}"
[model]
id = "{model}"
device = "cpu"
dtype = "fp32"
[routing]
text_layer = true
dedup = true
[[tasks]]
kind = "ocr"
max_new_tokens = 8
[[tasks]]
kind = "caption"
max_new_tokens = 8
[resources]
num_replicas = 1
batch_size = 4
""")
    return job, out


@pytest.fixture(scope="module")
def observed(tiny_model, tmp_path_factory):
    """The job's rows and a Prometheus scraping the Ray head the job ran on (both up for the tests)."""
    tmp = tmp_path_factory.mktemp("metrics")
    job, out = write_job(tmp, tiny_model)
    metrics_port = free_port()
    cluster = LocalCluster(head={"num_cpus": 4, "metrics_export_port": metrics_port}, workers=[])
    cluster.env["RAY_metrics_report_interval_ms"] = "2000"  # workers report every 2 s (default 10 s)
    with cluster:
        prometheus = Prometheus([f"127.0.0.1:{metrics_port}"])
        try:
            started = time.time()
            done = run_cli("run", "--job", str(job), "--address", cluster.address, env=cluster.env)
            assert done.returncode == 0, done.stderr[-4000:]
            rows = read_rows(out)
            written = len(rows)

            def all_rows_counted():
                total = sum(prometheus.by(f'sum(ray_scriptorium_rows_total{{run_id="{RUN_ID}"}})').values())
                return total == written

            wait_for(all_rows_counted, f"ray_scriptorium_rows_total summing to the {written} rows written")
            # The replicas' and tasks' last reports too (they come from other processes than the driver's).
            wait_for(lambda: prometheus.query(f'ray_scriptorium_documents_done{{run_id="{RUN_ID}"}}')
                     and prometheus.query(f'ray_scriptorium_batches_total{{run_id="{RUN_ID}"}}')
                     and prometheus.query(f'ray_scriptorium_routed_units_total{{run_id="{RUN_ID}"}}'),
                     "the driver's, the replica's and the route tasks' metrics")
            time.sleep(3)  # a few more scrapes: rate() over the window needs two samples of every series
            yield {"rows": rows, "prometheus": prometheus, "started": started}
        finally:
            prometheus.close()


def test_rows_counters_equal_the_rows_the_job_wrote_by_task_and_status(observed):
    rows, prometheus = observed["rows"], observed["prometheus"]
    expected = Counter((r["task"], r["status"]) for r in rows)
    assert {status for _, status in expected} == {"ok", "error"}  # the job has both
    rows_total = f'ray_scriptorium_rows_total{{run_id="{RUN_ID}"}}'
    counted = prometheus.by(f"sum by (task, status) ({rows_total})", "task", "status")
    assert counted == {key: float(n) for key, n in expected.items()}
    # By the stage that failed them and the route that answered them, too.
    by_stage = Counter((r["stage"] or "", r["route"] or "") for r in rows)
    counted = prometheus.by(f"sum by (stage, route) ({rows_total})", "stage", "route")
    assert counted == {key: float(n) for key, n in by_stage.items()}


def test_stage_counters_agree_with_the_rows(observed):
    rows, prometheus = observed["rows"], observed["prometheus"]
    pages_total = f'ray_scriptorium_pages_total{{run_id="{RUN_ID}"}}'
    pages = prometheus.by(f"sum by (stage, status) ({pages_total})", "stage", "status")
    page_rows = {(r["source_uri"], r["page"]) for r in rows}
    assert pages[("render", "ok")] + pages.get(("render", "error"), 0) == len(page_rows)
    assert pages[("render", "error")] == len({(r["source_uri"], r["page"]) for r in rows if r["stage"] == "render"})
    model_rows = [r for r in rows if r["route"] == "model"]
    retried = sum(prometheus.by(f'sum(ray_scriptorium_units_retried_total{{run_id="{RUN_ID}"}})').values())
    # Every model row came out of one batch (a retried unit, of two or more).
    assert pages[("generate", "ok")] == len(model_rows) + retried
    tokens = prometheus.by(f'sum(ray_scriptorium_input_tokens_total{{run_id="{RUN_ID}"}})')[()]
    if not retried:
        assert tokens == sum(r["n_input_tokens"] for r in model_rows)
        assert prometheus.by(f'sum(ray_scriptorium_output_tokens_total{{run_id="{RUN_ID}"}})')[()] == \
            sum(r["n_output_tokens"] for r in model_rows)
    routed = prometheus.by(f'sum by (route) (ray_scriptorium_routed_units_total{{run_id="{RUN_ID}"}})', "route")
    assert routed[("text_layer",)] == sum(r["route"] == "text_layer" for r in rows)
    assert routed[("dedup",)] == sum(r["route"] == "dedup" for r in rows) > 0  # b-copy.pdf's units
    read = prometheus.by(f'sum(ray_scriptorium_read_bytes_total{{run_id="{RUN_ID}"}})')[()]
    assert read == sum(p.stat().st_size for p in Path(rows[0]["source_uri"]).parent.glob("*.pdf"))
    assert prometheus.by(f'sum(ray_scriptorium_replica_starts_total{{run_id="{RUN_ID}"}})')[()] == 1
    # A gauge leaves Ray's export with the process that set it (the driver, here): its last value is in
    # Prometheus' history.
    assert prometheus.by(f'max(max_over_time(ray_scriptorium_documents_done{{run_id="{RUN_ID}"}}[10m]))')[()] == 4
    assert prometheus.by(f'max(max_over_time(ray_scriptorium_documents_planned{{run_id="{RUN_ID}"}}[10m]))')[()] == 4


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [(f"variable {v['name']}", v["query"]["query"]) for v in dashboard["templating"]["list"]
                if v["type"] == "query"]
    return queries


def as_promql(expr: str, range_s: float = 600) -> str:
    """A dashboard query as Grafana sends it: its variables replaced (the run, every session, the window)."""
    expr = expr.replace("$RayJob", RUN_ID).replace("$SessionName", ".+")
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{math.ceil(range_s)}s")


def test_the_dashboard_uses_a_datasource_variable_and_a_run_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "run_id" in variables["RayJob"]["query"]["query"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            ours = "ray_scriptorium_" in target["expr"]
            assert ours == ('run_id=~"$RayJob"' in target["expr"]), (panel["title"], target["expr"])
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("pages/s", "tokens/s", "error", "occupancy", "gpu utilisation", "eta"):
        assert needed in titles


@pytest.mark.parametrize("title, expr", dashboard_queries(), ids=[t for t, _ in dashboard_queries()])
def test_every_dashboard_query_returns_data(observed, title, expr):
    prometheus = observed["prometheus"]
    if expr.startswith("label_values("):  # a variable: Grafana asks the series API for the label's values
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", expr).groups()
        answer = prometheus.api("series", **{"match[]": as_promql(selector)})
        assert answer["status"] == "success", answer
        assert {s[label] for s in answer["data"] if label in s}, (title, expr)
        return
    # As Grafana shows a panel: the query over the dashboard's time range, from the run's start to now.
    start, end = observed["started"], time.time()
    promql = as_promql(expr, end - start)
    result = prometheus.query_range(promql, start, end)  # asserts the query is valid PromQL
    if any(name in expr for name in GPU_METRICS):
        # Ray exports its GPU metrics only from nodes with a GPU, and this cluster's one node has none:
        # the query is valid and finds nothing here. Ray names and labels them (ray_node_gpus_utilization,
        # ray_node_gram_used; GpuIndex) in ray/dashboard/modules/reporter: a GPU cluster's panels fill.
        assert not prometheus.query('{__name__=~"ray_node_gpus_.*|ray_node_gram_.*"}')
        return
    assert result, (title, promql)
    values = [float(value) for series in result for _, value in series["values"]]
    assert any(math.isfinite(v) for v in values), (title, promql, values)

