"""Where run summaries are kept, beside the output's Parquet files:

- `_runs/<run_id>/summary.json`: the run view (jobs/summary.py), written when the run ends, since wall
  time and resources are known only then; a resumed run id's summary adds the new attempt to it.
- `_summary.json`: the run view and the output view as of the last run.

`scriptorium summary OUTPUT` reads the run view back and recomputes the output view. The bookkeeping
names start with `_`, so dataset readers skip them and the folder stays one dataset.
"""

from __future__ import annotations

import json

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.jobs.summary import build_output_summary, build_run_summary, with_earlier_attempts
from scriptorium.jobs.summary_text import summary_json

RUNS_DIR = "_runs"
LATEST_FILE = "_summary.json"


def read_run_summaries(store: ParquetStore) -> list[dict]:
    """Every `_runs/*/summary.json`, oldest first."""
    pattern = f"{store.root}/{RUNS_DIR}/*/summary.json"
    summaries = []
    for path in store.fs.glob(pattern):
        try:
            summary = json.loads(store.fs.cat_file(path))
        except (OSError, ValueError):
            continue  # a summary being written right now, or damaged: the output view does without it
        if summary.get("kind") == "run":  # not the older, shorter format
            summaries.append(summary)
    return sorted(summaries, key=lambda s: (s.get("finished_at", ""), s.get("run_id", "")))


def write_run_summary(store: ParquetStore, spec, result, gpus_per_replica: float) -> dict:
    """At the end of a run: `_runs/<run_id>/summary.json` (with the attempts before this one, if the
    run id was resumed) and `_summary.json` (this run + the output)."""
    run = build_run_summary(store, spec, result, gpus_per_replica)
    path = f"{store.root}/{RUNS_DIR}/{result.run_id}/summary.json"
    summaries = read_run_summaries(store)
    earlier = next((r for r in summaries if r.get("run_id") == result.run_id), None)
    if earlier is not None:
        run = with_earlier_attempts(earlier, run)
    store.fs.pipe_file(path, summary_json(run).encode())
    runs = [r for r in summaries if r.get("run_id") != run["run_id"]] + [run]
    latest = {"run": run, "output": build_output_summary(store, runs)}
    store.fs.pipe_file(f"{store.root}/{LATEST_FILE}", summary_json(latest).encode())
    return latest


def load_summary(store: ParquetStore, run_id: str | None = None) -> dict:
    """For `scriptorium summary`: the latest run's (or `run_id`'s) stored summary and a fresh output view.

    Raises SpecError with a one-line reason when the output has nothing to summarize.
    """
    runs = read_run_summaries(store)
    if run_id:
        matches = [r for r in runs if r.get("run_id") == run_id]
        if not matches:
            known = ", ".join(r.get("run_id", "?") for r in runs) or "none"
            raise SpecError(f"no run {run_id!r} in {store.uri} (runs there: {known})")
        run = matches[-1]
    else:
        run = runs[-1] if runs else None
    output = build_output_summary(store, runs)
    if run is None and not output["n_files"]:
        raise SpecError(f"{store.uri} holds no Scriptorium results: pass the --output of a run")
    return {"run": run, "output": output}
