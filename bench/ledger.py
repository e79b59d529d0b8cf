"""Resume planning against published outputs of 10^6, 10^7 and 10^8 units: time and driver peak memory.

    .venv/bin/python bench/ledger.py                       # 1e6, 1e7, 1e8; the baseline at 1e6 and 1e7
    .venv/bin/python bench/ledger.py --sizes 1e6 --baseline-sizes ""   # quick
    .venv/bin/python bench/ledger.py --scratch /big/disk/ledger-bench

Each output is the sink's files after two runs over an archive of 50-page documents with two tasks
(bench/_archive_output.py: RESULT_SCHEMA, zstd, 2,000 rows a file; some documents partly done, some
with error rows; the listing has changed and new documents too). It is built once under --scratch
and reused (the 1e8 one takes ~3 GB and several minutes to build).

Planning is measured as `run_job` does it, in a fresh process per size: `read_ledger` over the output,
then `jobs.planning.write_plan` over the listing (the listing itself is synthetic, yielded as
`list_inputs` would yield it, so listing the input store is not part of the figure), writing the
plan files. The figure is that process's wall time and peak RSS (`ru_maxrss`: the interpreter,
pyarrow and DuckDB included); its CPU time is printed beside them. The baseline is the same against the ledger as it was before issue
#19 (bench/_ledger_before.py: every published key in Python sets), at the sizes it can hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

TARGETS = {"resume_plan_s": 60, "resume_plan_peak_gb": 2}  # set for 1e8 units


def plan_spec(folder: Path, run_id: str, retry_failed: bool = False):
    from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, TaskSpec

    return JobSpec(run_id=run_id, input=InputSpec(uri="s3://archive-bench/"),
                   output=OutputSpec(uri=str(folder), retry_failed=retry_failed), model=ModelSpec(id="unused"),
                   tasks=[TaskSpec(kind="ocr"), TaskSpec(kind="caption")])


def measure(side: str, folder: Path, units: int, retry_failed: bool) -> dict:
    """Plan a rerun against the output in `folder` (in this process); what it took."""
    from _archive_output import listing

    from scriptorium.connectors.parquet_sink import ParquetStore
    from scriptorium.core.units import work_units

    spec = plan_spec(folder, f"bench-plan-{side}", retry_failed)
    store = ParquetStore(str(folder))
    work = store.work_folder(spec.run_id)
    if side == "new":  # imported before the clock starts: a driver has them loaded before it plans
        import scriptorium.jobs.planning as planning
        from scriptorium.connectors.ledger import read_ledger
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if side == "new":
        planning.list_inputs = lambda _input, _storage, skip=None: listing(units)  # the input store's listing, synthetic
        ledger = read_ledger(store, work_units(spec.tasks), errors_done=not retry_failed)
        plan = planning.write_plan(spec, store, ledger)
        counts = {"planned": plan.planned, "skipped": plan.skipped, "stale": len(plan.stale),
                  "retried": len(plan.retried)}
    else:
        from _ledger_before import plan_before, read_ledger

        ledger = read_ledger(store, work_units(spec.tasks), errors_done=not retry_failed)
        counts = plan_before(ledger, listing(units), lambda row: work_units(spec.tasks, row.get("questions")),
                             store, work, retry_failed)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **counts}


def cpu_seconds() -> float:
    """CPU time of this process, all its threads (DuckDB scans on every core): on a busy shared machine
    a steadier figure than wall time, and on a quiet one wall time is about this over the cores used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_in_subprocess(side: str, folder: Path, units: int, retry_failed: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", side, "--folder", str(folder),
                           "--units", str(units)] + (["--retry-failed"] if retry_failed else []),
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} planning at {units:.0e} units failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_label(units: int) -> str:
    return f"1e{len(str(units)) - 1}" if str(units).strip("0") == "1" else str(units)


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="published units, comma-separated")
    parser.add_argument("--baseline-sizes", default="1e6,1e7", help="sizes to measure the old ledger at too")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "scriptorium-bench-ledger"),
                        help="where the synthetic outputs are built and kept")
    parser.add_argument("--retry-failed", action="store_true", help="plan as --retry-failed would")
    parser.add_argument("--measure", choices=["new", "before"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--units", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.folder), args.units, args.retry_failed)))
        return

    from _archive_output import build

    sizes, baseline = parse_sizes(args.sizes), set(parse_sizes(args.baseline_sizes))
    scratch = Path(args.scratch)
    print(f"outputs under {scratch} (free: {shutil.disk_usage(scratch.parent if not scratch.exists() else scratch).free / 2**30:.0f} GiB)")
    print(f"{'units':>6} {'files':>7} {'ledger':>7} {'seconds':>8} {'cpu s':>7} {'peak GB':>8} {'planned':>8}"
          f" {'skipped':>8} {'stale':>6} {'retried':>7}")
    rows = {}
    for units in sizes:
        started = time.perf_counter()
        folder = build(scratch / f"out-{size_label(units)}", units)
        built = time.perf_counter() - started
        if built > 1:
            print(f"(built {folder} in {built:.0f} s)")
        n_files = sum(1 for name in os.listdir(folder) if name.endswith(".parquet"))
        for side in (["before"] if units in baseline else []) + ["new"]:
            r = measure_in_subprocess(side, folder, units, args.retry_failed)
            rows[(side, units)] = r
            print(f"{size_label(units):>6} {n_files:7d} {side:>7} {r['seconds']:8.2f} {r['cpu_seconds']:7.1f}"
                  f" {r['peak_bytes'] / 1e9:8.2f}"
                  f" {r['planned']:8d} {r['skipped']:8d} {r['stale']:6d} {r['retried']:7d}", flush=True)
            if side == "new" and ("before", units) in rows:
                before = rows[("before", units)]
                assert (r["planned"], r["skipped"], r["stale"], r["retried"]) == (
                    before["planned"], before["skipped"], before["stale"], before["retried"]), "plans differ"
    for units in sizes:  # the same budget at every size: a smaller output must fit it too
        new, before = rows[("new", units)], rows.get(("before", units))
        if before:
            print(f"before #19 at {size_label(units)}: {before['seconds']:.2f} s ({before['cpu_seconds']:.1f} CPU-s), "
                  f"{before['peak_bytes'] / 1e9:.2f} GB; now {new['seconds']:.2f} s ({new['cpu_seconds']:.1f} CPU-s), "
                  f"{new['peak_bytes'] / 1e9:.2f} GB")
    for units in sizes:
        new = rows[("new", units)]
        print(f"RESULT resume_plan_s_{size_label(units)} {new['seconds']:.2f} s target <= {TARGETS['resume_plan_s']}")
        print(f"RESULT resume_plan_peak_gb_{size_label(units)} {new['peak_bytes'] / 1e9:.2f} GB "
              f"target <= {TARGETS['resume_plan_peak_gb']}")

if __name__ == "__main__":
    main()
