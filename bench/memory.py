"""Peak memory of a pipeline run over 500 pages against one over 5,000: streaming keeps it flat.

    .venv/bin/python bench/memory.py [--small 500] [--large 5000] [--replicas 1]
    .venv/bin/python bench/memory.py --address auto --workdir s3://bucket/bench --model /shared/tiny-idefics2
    .venv/bin/python bench/memory.py --local-cluster --replicas 2   # multi-node Ray on this one machine

Each run is `jobs.runner.run_job` on multi-page PDFs (50 pages each) with the tiny model, cheap on
purpose: pages rendered at a small longest edge, no splitting, 2 new tokens, so the run measures the
pipeline's own memory (queues, blocks, the sink, the ledger) rather than a model's. Memory is sampled
every 0.2 s with psutil as the sum over the run's processes of PSS (proportional set size: pages shared
between processes, such as Ray's object store, count once) and of RSS:

- local Ray (default): the driver and all its descendants (GCS, raylet, object store, every worker);
  each run starts its own Ray, so the second run inherits nothing from the first;
- `--address`: the driver, plus every node's raylet and its workers, sampled by a small actor on each
  node (per-node peaks are summed, an upper bound); both runs share the cluster, small one first.
  Inputs and outputs then live under `--workdir` (a URI every node can read), and `--model` must be a
  checkpoint path that exists on every node (or a hub id).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

import psutil  # noqa: E402

PAGES_PER_DOCUMENT = 50
SAMPLE_EVERY_S = 0.2


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) summed over `root` and all its descendants, in bytes; vanished processes are skipped."""
    pss = rss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return pss, rss


class PeakSampler:
    """Samples `measure()` in a background thread and keeps the peaks."""

    def __init__(self, measure):
        self.measure = measure
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            pss, rss = self.measure()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_node_samplers():
    """One sampler actor per alive node, measuring its raylet (the workers' parent) and descendants."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class NodeSampler:
        def __init__(self):
            raylet = psutil.Process(os.getpid()).parent()
            self.sampler = PeakSampler(lambda: tree_memory(raylet))
            self.sampler.__enter__()

        def peaks(self) -> tuple[int, int]:
            self.sampler.__exit__()
            return self.sampler.peak_pss, self.sampler.peak_rss

    return [
        NodeSampler.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
        for node in ray.nodes() if node["Alive"]
    ]


def write_documents(workdir: str, n_pages: int) -> str:
    """Plain one-line PDF pages in documents of 50 pages, under WORKDIR/pdfs-N; returns that URI."""
    import fsspec
    import pymupdf

    folder = f"{workdir.rstrip('/')}/pdfs-{n_pages}"
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    for start in range(0, n_pages, PAGES_PER_DOCUMENT):
        doc = pymupdf.open()
        for number in range(start, min(start + PAGES_PER_DOCUMENT, n_pages)):
            page = doc.new_page(width=595, height=842)
            page.insert_text((72, 100), f"Page {number}: the archive holds letters, ledgers and maps.", fontsize=14)
        fs.pipe_file(f"{path}/doc-{start // PAGES_PER_DOCUMENT:05d}.pdf", doc.tobytes())
        doc.close()
    return folder


def run(n_pages: int, model: str, workdir: str, args) -> dict:
    import ray

    from scriptorium.core.spec import (
        InputSpec,
        JobSpec,
        ModelSpec,
        OutputSpec,
        RenderSpec,
        ResourceSpec,
        TaskSpec,
    )
    from scriptorium.jobs.ray_setup import init_ray
    from scriptorium.jobs.runner import run_job

    spec = JobSpec(
        run_id=f"memory-{n_pages}",
        input=InputSpec(uri=write_documents(workdir, n_pages)),
        output=OutputSpec(uri=f"{workdir.rstrip('/')}/out-{n_pages}", overwrite=True),
        model=ModelSpec(id=model, device="cpu", dtype="fp32", do_image_splitting=False,
                        longest_edge=args.longest_edge, shortest_edge=args.longest_edge // 2),
        render=RenderSpec(page_edge=args.longest_edge),
        tasks=[TaskSpec(kind="ocr", max_new_tokens=2)],
        resources=ResourceSpec(address=args.address, num_replicas=args.replicas, batch_size=args.batch_size),
    )
    started = time.perf_counter()
    if args.address:
        init_ray(spec.resources)
        samplers = start_node_samplers()
        with PeakSampler(lambda: tree_memory(psutil.Process())) as driver:
            result = run_job(spec)
        node_peaks = ray.get([s.peaks.remote() for s in samplers])
        peak_pss = driver.peak_pss + sum(p for p, _ in node_peaks)
        peak_rss = driver.peak_rss + sum(r for _, r in node_peaks)
    else:
        with PeakSampler(lambda: tree_memory(psutil.Process())) as driver:
            init_ray(spec.resources)
            result = run_job(spec)
        peak_pss, peak_rss = driver.peak_pss, driver.peak_rss
        ray.shutdown()  # the next run starts a fresh local Ray
    return {"pages": n_pages, "rows": result.rows_written, "ok": result.ok_rows, "seconds": time.perf_counter() - started,
            "pss": peak_pss, "rss": peak_rss}


def run_on_local_cluster(argv: list[str]) -> int:
    """Start the multi-node layout of tests/test_multinode.py on this machine and run this benchmark
    against it as a separate driver process, as a user's driver would connect to a cluster."""
    import subprocess

    from tests.local_cluster import LocalCluster

    gpu_node = {"num_cpus": 1, "num_gpus": 1}
    with LocalCluster(head={"num_cpus": 0}, workers=[gpu_node, gpu_node, {"num_cpus": 3}]) as cluster:
        rest = [a for a in argv if a != "--local-cluster"]
        print("local cluster: a head without CPUs, two 1-CPU nodes declaring a GPU each, one 3-CPU node", flush=True)
        return subprocess.run([sys.executable, __file__, "--address", cluster.address, *rest], env=cluster.env).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--longest-edge", type=int, default=112, help="render and model size (cheap pages)")
    parser.add_argument("--address", default="", help="Ray cluster address (default: a fresh local Ray per run)")
    parser.add_argument("--workdir", default="", help="URI for inputs and outputs (default: a local temp dir)")
    parser.add_argument("--model", default="", help="checkpoint every node can load (default: build the tiny one)")
    parser.add_argument("--local-cluster", action="store_true",
                        help="run on a multi-node Ray cluster started on this machine (the layout of "
                             "tests/test_multinode.py: a head without CPUs, two 1-CPU nodes declaring a GPU "
                             "each, one 3-CPU node)")
    args = parser.parse_args()

    if args.local_cluster:
        sys.exit(run_on_local_cluster(sys.argv[1:]))

    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        model = args.model or str(build_tiny_idefics2(Path(tmp) / "model"))
        runs = [run(n, model, workdir, args) for n in (args.small, args.large)]

    where = f"cluster {args.address}" if args.address else f"local Ray, {os.cpu_count()} cores"
    print(f"tiny Idefics2, pages at longest edge {args.longest_edge}, 2 new tokens, {args.replicas} replica(s), "
          f"batch size {args.batch_size}; {where}")
    print(f"{'pages':>7}{'rows ok':>9}{'seconds':>9}{'pages/s':>9}{'peak PSS GiB':>14}{'peak RSS GiB':>14}")
    for r in runs:
        print(f"{r['pages']:7d}{r['ok']:9d}{r['seconds']:9.1f}{r['pages'] / r['seconds']:9.1f}"
              f"{r['pss'] / 2**30:14.2f}{r['rss'] / 2**30:14.2f}")
    small, large = runs
    print(f"growth for {large['pages'] / small['pages']:.0f}x the pages: PSS {large['pss'] / small['pss']:.2f}x, "
          f"RSS {large['rss'] / small['rss']:.2f}x")
    print(f"RESULT memory_growth {large['pss'] / small['pss']:.2f} x target <= 1.2")
    if small["ok"] != small["pages"] or large["ok"] != large["pages"]:
        sys.exit("some pages did not come out ok: the figures above are not comparable")


if __name__ == "__main__":
    main()
