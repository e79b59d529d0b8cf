"""The driver's memory over a long run: 10^6 result rows through its bookkeeping, without a model or Ray.

    .venv/bin/python bench/driver_soak.py [--rows 1000000] [--batch-rows 128]

What `jobs.streaming.run_stages` does with every batch that comes out of Ray Data, in the same order,
after planning against an earlier output of 10^6 units (as `run_job` does): the progress line
(`Progress.update`), the safety net (`SinkGuard.drop_done`, whose ledger checks the rows of partly
done sources against that output), the row counters and the Parquet sink; then the
end-of-run summary over the published files (`tally_files`, both views). The rows are synthetic
result rows of 50-page documents with two tasks (bench/_synthetic.py), in batches of `--batch-rows`
as the model stage emits them, a few documents in flight at a time.

The driver's resident memory (RSS, after garbage collection and with allocator caches handed back) is
sampled after every 5% of the rows; the growth per page is the
least-squares slope from 20% to the end (the start warms up allocator pools, DuckDB and the sink's
first files). The baseline is the same loop with the bookkeeping as it was before issue #19 (a hash
per written row, bench/_ledger_before.py). Ray Data's own per-block statistics are bounded separately
(jobs/block_stats.py) and measured by bench/memory.py on real runs.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

TARGET_BYTES_PER_PAGE = 50
SAMPLES = 20


def live_rss_bytes() -> int:
    """Resident memory after handing back what allocators cache (freed but kept for reuse), so the
    samples follow live memory rather than allocator pools: Python's garbage, glibc's free lists and
    pyarrow's pool."""
    import ctypes

    import pyarrow as pa

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    pa.default_memory_pool().release_unused()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def batches(n_rows: int, batch_rows: int, first_document: int):
    """Result batches of 50-page, two-task documents, 8 documents in flight, pages out of order."""

    from _synthetic import PAGES_PER_DOCUMENT, TASKS, ResultRows

    rows = ResultRows(seed=1)
    per_window = 8 * PAGES_PER_DOCUMENT * len(TASKS)
    made = 0
    document = first_document
    while made < n_rows:
        unit = rows.rng.permutation(per_window)
        documents = document + unit // (PAGES_PER_DOCUMENT * len(TASKS))
        pages = unit % (PAGES_PER_DOCUMENT * len(TASKS)) // len(TASKS)
        tasks = unit % len(TASKS)
        for start in range(0, per_window, batch_rows):
            end = min(start + batch_rows, per_window, start + n_rows - made)
            if end <= start:
                return
            yield rows.table(documents[start:end], pages[start:end], tasks[start:end], "soak")
            made += end - start
        document += 8


def soak(side: str, n_rows: int, batch_rows: int, earlier: Path, earlier_units: int, workdir: Path) -> dict:
    """Stream the rows through the driver's bookkeeping (in this process); what memory did."""
    import numpy as np

    from scriptorium.connectors.ledger import read_ledger
    from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
    from scriptorium.connectors.sink_guard import SinkGuard
    from scriptorium.jobs.progress import Progress
    from scriptorium.jobs.tally import tally_files
    from scriptorium.core.units import work_units

    from ledger import plan_spec

    output = workdir / "out"
    shutil.copytree(earlier, output)  # the earlier run's output: the ledger has 10^6 units to check against
    spec = plan_spec(output, "soak")
    store = ParquetStore(str(output))
    ledger = read_ledger(store, work_units(spec.tasks))
    if side == "new":  # planned first, as run_job does: the ledger learns which sources are partly done
        import scriptorium.jobs.planning as planning
        from _archive_output import listing

        planning.list_inputs = lambda _input, _storage, skip=None: listing(earlier_units)
        planning.write_plan(spec, store, ledger)
        shutil.rmtree(output / "_work")
        guard = SinkGuard(ledger)
        drop_done = guard.drop_done
    else:
        from _ledger_before import drop_done_before

        written: set[int] = set()
        done_keys = ledger_keys(store)
        drop_done = lambda batch: drop_done_before(batch, done_keys, written)  # noqa: E731
    sink = ParquetSink(store, "soak", spec.output.rows_per_file, spec.output.seconds_per_file)
    progress = Progress(documents=n_rows // 100, stream=io.StringIO(), live=False, every_s=3600)
    samples, seen, ok_rows, error_rows = [], 0, 0, 0
    every = n_rows // SAMPLES
    started = time.perf_counter()
    with progress:
        for batch in batches(n_rows, batch_rows, first_document=10**7):
            progress.update(batch)
            batch = drop_done(batch)
            statuses = batch["status"].to_pylist()
            ok_rows += statuses.count("ok")
            error_rows += statuses.count("error")
            sink.write(batch)
            seen += batch.num_rows
            if seen // every > len(samples) - 1:
                samples.append((progress.pages_done, live_rss_bytes()))
    sink.close()
    streamed_s = time.perf_counter() - started
    pages, rss = np.array(samples[SAMPLES // 5:], float).T
    slope = float(np.polyfit(pages, rss, 1)[0])
    started = time.perf_counter()
    run_view = tally_files(store, sink.published)
    output_view = tally_files(store, store.data_files())
    summary_s = time.perf_counter() - started
    return {"rows": seen, "pages": progress.pages_done, "written": sink.rows_written, "ok": ok_rows,
            "streamed_s": streamed_s, "summary_s": summary_s, "bytes_per_page": slope,
            "rss_first": samples[0][1], "rss_last": samples[-1][1],
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "run_pages": run_view["pages"]["total"], "output_pages": output_view["pages"]["total"]}


def ledger_keys(store) -> set:
    """The baseline's `done_keys`: every published key as a Python tuple."""
    from _ledger_before import read_ledger as read_ledger_before

    return read_ledger_before(store).done_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=128)
    parser.add_argument("--earlier-units", type=lambda text: int(float(text)), default=1_000_000,
                        help="size of the earlier output the run resumes (built once under --scratch)")
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "scriptorium-bench-ledger"))
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--side", choices=["new", "before"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from _archive_output import build

    from ledger import size_label

    earlier = build(Path(args.scratch) / f"out-{size_label(args.earlier_units)}", args.earlier_units)
    if args.side:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(soak(args.side, args.rows, args.batch_rows, earlier, args.earlier_units, Path(workdir))))
        return

    results = {}
    for side in (["before"] if not args.no_baseline else []) + ["new"]:
        done = subprocess.run([sys.executable, __file__, "--side", side, "--rows", str(args.rows),
                               "--batch-rows", str(args.batch_rows), "--earlier-units", str(args.earlier_units),
                               "--scratch", args.scratch], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {side} soak failed:\n{done.stderr[-3000:]}")
        results[side] = r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side:>7}: {r['rows']} rows ({r['pages']} pages) in {r['streamed_s']:.1f} s, {r['written']} written; "
              f"RSS {r['rss_first'] / 2**20:.0f} -> {r['rss_last'] / 2**20:.0f} MiB, "
              f"{r['bytes_per_page']:.1f} B/page from 20% on; summary {r['summary_s']:.1f} s "
              f"({r['run_pages']} pages this run, {r['output_pages']} in the output); peak {r['peak_bytes'] / 2**30:.2f} GiB",
              flush=True)
        if r["written"] != r["rows"] or r["run_pages"] != r["pages"]:
            sys.exit("rows were dropped or pages miscounted: the figures are not comparable")
    print(f"RESULT driver_growth_bytes_per_page {max(results['new']['bytes_per_page'], 0):.1f} B "
          f"target <= {TARGET_BYTES_PER_PAGE}")


if __name__ == "__main__":
    main()
