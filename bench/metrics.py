"""What the application metrics cost: the same job with `[resources] metrics` on and off, in one run.

    .venv/bin/python bench/metrics.py [--pages 96] [--max-new-tokens 32] [--repeats 3]

The work is bench/pipeline.py's: OCR of report PDFs (rendered at 1960 px, split) with the tiny Idefics2
on CPU, two replicas, batches of 8, results to Parquet, through `jobs.runner.run_job`. One local Ray,
started once with its metrics export port open (so the metrics agent really receives and exports every
series), runs the job with metrics on and off alternately, `--repeats` times each; each keeps its best
time, and every time is printed. Ray's start is not in the times.

It also times the recording calls themselves (`pipeline/metrics.py`) on the job's own batch sizes, in
this process joined to that Ray: the cost per page that the end-to-end ratio should reflect.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

from documents import write_reports  # noqa: E402

PAGES_PER_DOCUMENT = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: Path, folder: Path, out: Path, metrics: bool, args) -> tuple[float, int]:
    """(seconds, result rows) of one run of the job with metrics on or off."""
    from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, ResourceSpec, TaskSpec
    from scriptorium.jobs.runner import run_job

    spec = JobSpec(
        run_id=f"bench-metrics-{'on' if metrics else 'off'}",
        input=InputSpec(uri=str(folder)),
        output=OutputSpec(uri=str(out)),
        model=ModelSpec(id=str(model), device="cpu", dtype="fp32"),
        tasks=[TaskSpec(kind="ocr", max_new_tokens=args.max_new_tokens)],
        resources=ResourceSpec(num_replicas=args.replicas, batch_size=args.batch_size, metrics=metrics),
    )
    started = time.perf_counter()
    result = run_job(spec)
    return time.perf_counter() - started, result.rows_written


def recording_cost(batch_size: int, calls: int = 2000) -> float:
    """Seconds the recording calls take per page, in this process: for `batch_size` pages, the render
    blocks and preprocess calls of 4 pages each, one model batch, one written batch and the driver's
    progress, each recorded as the stages record them."""
    import pyarrow as pa

    from scriptorium.core.schema import RESULT_SCHEMA
    from scriptorium.pipeline.metrics import Meter

    meter = Meter("bench-recording", True)
    block = [{"status": "ok"}] * 4
    rows = [{"n_input_tokens": 400, "n_output_tokens": 30, "max_new_tokens": 32}] * batch_size
    written = pa.Table.from_pylist([{"task": "ocr", "status": "ok", "route": "model"}] * batch_size,
                                   schema=RESULT_SCHEMA)
    started = time.perf_counter()
    for _ in range(calls):
        for _ in range(max(1, batch_size // 4)):
            meter.pages("render", block)
            meter.bytes_read(100_000)
            meter.pages("preprocess", block)
        meter.batch("replica", "node", rows, 1.0)
        meter.rows(written)
        meter.progress(10, 5, 30.0)
    return (time.perf_counter() - started) / calls / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best time of each counts")
    args = parser.parse_args()

    import ray

    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_idefics2(tmp / "model", do_image_splitting=True)
        folder = tmp / "pdfs"
        write_reports(folder, args.pages, PAGES_PER_DOCUMENT)
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, _metrics_export_port=free_port())
        times: dict[bool, list[float]] = {True: [], False: []}
        pages = 0
        run(model, folder, tmp / "warm-up", True, args)  # workers started, the model's files in the page cache
        for attempt in range(args.repeats):
            for metrics in ((True, False) if attempt % 2 == 0 else (False, True)):
                seconds, pages = run(model, folder, tmp / f"out-{metrics}-{attempt}", metrics, args)
                times[metrics].append(seconds)
        per_page_s = recording_cost(args.batch_size)
        ray.shutdown()

    on, off = min(times[True]), min(times[False])
    print(f"work: {pages} PDF pages, OCR with the tiny Idefics2 (splitting, pages at 1960), greedy, "
          f"max_new_tokens={args.max_new_tokens}; {args.replicas} replicas, batches of {args.batch_size}; "
          f"{os.cpu_count()} CPU cores; Ray with its metrics export port open")
    print(f"best of {args.repeats} runs each, alternating; all runs (s): metrics on "
          f"{', '.join(f'{t:.1f}' for t in times[True])}; off {', '.join(f'{t:.1f}' for t in times[False])}")
    print(f"{'':24}{'seconds':>10}{'pages/s':>10}")
    print(f"{'metrics off':24}{off:10.1f}{pages / off:10.2f}")
    print(f"{'metrics on':24}{on:10.1f}{pages / on:10.2f}")
    print(f"recording calls: {per_page_s * 1e6:.1f} us per page, {per_page_s * pages / off * 100:.3f}% of the "
          f"job's time with metrics off")
    print(f"RESULT metrics_overhead {on / off:.3f} x target <= 1.02")


if __name__ == "__main__":
    main()
