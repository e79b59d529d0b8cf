"""Peak memory and speed of `scriptorium export` over a large synthetic output: it streams.

    .venv/bin/python bench/export.py [--rows 100000] [--format jsonl] [--text-bytes 2000]

The output is made here, without a model: documents of 10 pages with an OCR row (about --text-bytes of
text) and a caption row per page, written as the sink writes them (files of 2,000 rows) by two runs, and
shuffled, so every document's rows lie in many files and the export has to sort and group them. The
export then runs as a user runs it, `scriptorium export` in its own process, whose peak resident memory
(the kernel's ru_maxrss, imports included) is what the target bounds. The same export over a tenth of
the rows runs first: streaming shows as a peak that hardly grows with ten times the rows.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

import pyarrow as pa  # noqa: E402

PAGES_PER_DOCUMENT = 10
ROWS_PER_FILE = 2000  # the sink's default
PEAK_TARGET_MB = 500
WORDS = ("archive ledger parish harvest letter invoice total chapter map river mill church school road "
         "market census baptism marriage burial tithe rent farm field acre bushel shilling pound").split()


def synthetic_output(folder: Path, rows: int, text_bytes: int, seed: int = 0) -> int:
    """Write `rows` result rows (OCR and caption of 10-page documents) as shuffled files of two runs.
    Returns the bytes of text written."""
    from scriptorium.connectors.parquet_sink import ParquetStore
    from scriptorium.connectors.namespace import data_file_name
    from scriptorium.core.schema import RESULT_SCHEMA

    rng = random.Random(seed)
    words_per_text = max(1, text_bytes // 7)
    units = [(doc, page, task) for doc in range(rows // (2 * PAGES_PER_DOCUMENT))
             for page in range(PAGES_PER_DOCUMENT) for task in ("caption", "ocr")]
    rng.shuffle(units)
    store, text_total = ParquetStore(str(folder)), 0
    for number in range(0, len(units), ROWS_PER_FILE):
        run_id = "run-a" if number < len(units) // 2 else "run-b"
        batch = []
        for doc, page, task in units[number:number + ROWS_PER_FILE]:
            text = " ".join(rng.choices(WORDS, k=words_per_text if task == "ocr" else 8))
            text_total += len(text)
            batch.append({"source_uri": f"s3://archive/scans/{doc // 100:03d}/doc-{doc:06d}.pdf", "page": page,
                          "n_pages": PAGES_PER_DOCUMENT, "task": task, "status": "ok", "text": text,
                          "model": "HuggingFaceM4/idefics2-8b", "route": "model", "source_etag": f"etag-{doc}",
                          "source_size": 100_000, "run_id": run_id, "n_input_tokens": 400, "n_output_tokens": 300})
        store.publish(pa.Table.from_pylist(batch, schema=RESULT_SCHEMA), data_file_name(run_id, number))
    return text_total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", default="jsonl", choices=["markdown", "text", "jsonl", "dolma"])
    parser.add_argument("--text-bytes", type=int, default=2000, help="characters of OCR text per page")
    args = parser.parse_args()

    small_peak, _ = measure(max(args.rows // 10, 2 * PAGES_PER_DOCUMENT), args)
    peak_mb, wall = measure(args.rows, args)
    print(f"peak at {max(args.rows // 10, 2 * PAGES_PER_DOCUMENT):,} rows: {small_peak:.0f} MB; "
          f"at {args.rows:,} rows: {peak_mb:.0f} MB")
    print(f"RESULT export_peak_mb {peak_mb:.0f} MB target <= {PEAK_TARGET_MB}")
    print(f"RESULT export_rows_per_s {args.rows / wall:.0f} rows/s target >= 5000")
    return 0


def measure(rows: int, args: argparse.Namespace) -> tuple[float, float]:
    """Make an output of `rows` rows and export it in a child process: (its peak memory in MB, seconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        output, target = Path(work) / "output", Path(work) / "export"
        started = time.perf_counter()
        text_total = synthetic_output(output, rows, args.text_bytes)
        on_disk = sum(p.stat().st_size for p in output.rglob("*.parquet"))
        print(f"output: {rows:,} rows, {text_total / 1e6:.0f} MB of text, {on_disk / 1e6:.0f} MB of Parquet "
              f"in {len(list(output.glob('*.parquet')))} files (made in {time.perf_counter() - started:.0f} s)")

        command = [sys.executable, "-c", CHILD, str(output), str(target), args.format]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=_setup.REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        peak_mb = int(done.stdout.split()[-1]) / 1024  # the child's own ru_maxrss, KiB on Linux
        written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"  export to {args.format}: {wall:.1f} s, {rows / wall:,.0f} rows/s, {written / 1e6:.0f} MB written, "
              f"peak resident memory {peak_mb:.0f} MB")
    return peak_mb, wall


# The export as `scriptorium export` runs it, then the process's own peak (each run in a fresh process).
CHILD = """
import resource, sys
from scriptorium.jobs.cli import main
assert main(["export", sys.argv[1], "--to", sys.argv[2], "--format", sys.argv[3]]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


if __name__ == "__main__":
    sys.exit(main())
