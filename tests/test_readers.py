"""The readers users load outputs with: Hugging Face `datasets`, Polars and DuckDB, on one run's output and
on the parent folder of two runs partitioned by run (`[output] uri = ".../run_id={run_id}"`). Each reads
every row pyarrow reads, with the column types of the output's schema: strings, int32, int64, bool,
float32, and nulls where a row has no value.

An output folder also holds bookkeeping (`_summary.json`, `_runs/`, `_work/`), which pyarrow skips by its
`_` prefix but these readers do not: they are given the Parquet files by pattern (`*.parquet` in one
output, `*/*.parquet` in a parent of runs), as docs/output.md says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_pdf, read_rows

pytestmark = pytest.mark.slow

RUNS = ("monday", "tuesday")
COMPARED = ("source_uri", "page", "task", "question", "status", "error", "text", "truncated", "run_id")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model, ray_local) -> Path:
    """Two runs over the same inputs (a two-page PDF, a broken PDF), each into its own run_id=... folder."""
    from scriptorium.core.spec import spec_from_dict
    from scriptorium.jobs.runner import run_job

    inputs = tmp_path_factory.mktemp("readers-in")
    make_pdf(inputs / "letter.pdf", ["Dear reader,", "Yours sincerely."], size=(200, 260))
    (inputs / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    parent = tmp_path_factory.mktemp("readers-out") / "ocr"
    for run_id in RUNS:
        run_job(spec_from_dict({
            "run_id": run_id,
            "input": {"uri": str(inputs)}, "output": {"uri": f"{parent}/run_id={{run_id}}"},
            "model": {"id": str(tiny_model), "device": "cpu", "longest_edge": 56, "shortest_edge": 28},
            "render": {"page_edge": 64}, "resources": {"batch_size": 4},
            "tasks": [{"kind": "ocr", "max_new_tokens": 4}, {"kind": "qa", "questions": ["Who wrote it?"],
                                                            "max_new_tokens": 4}],
        }))
    return parent


def reference(parent: Path, runs=RUNS) -> list[tuple]:
    """The rows as pyarrow reads them, run by run."""
    rows = [r for run_id in runs for r in read_rows(parent / f"run_id={run_id}")]
    assert {r["status"] for r in rows} == {"ok", "error"}
    return sorted(tuple(r[c] for c in COMPARED) for r in rows)


def assert_nulls_where_rows_have_no_value(rows: list[dict]) -> None:
    assert all(r["question"] is None for r in rows if r["task"] == "ocr")
    assert all(r["question"] == "Who wrote it?" for r in rows if r["task"] == "qa")
    assert all(r["error"] is None and r["generate_s"] > 0 for r in rows if r["status"] == "ok")
    assert all(r["error"] and r["generate_s"] is None and r["n_pages"] is None for r in rows if r["status"] == "error")


def test_hugging_face_datasets(outputs, tmp_path):
    import datasets

    def load(data_dir: Path, pattern: str):
        return datasets.load_dataset("parquet", data_dir=str(data_dir), data_files=pattern, split="train",
                                     cache_dir=str(tmp_path / "hf-cache"))

    one = load(outputs / "run_id=monday", "*.parquet")
    both = load(outputs, "*/*.parquet")
    for dataset, runs in ((one, RUNS[:1]), (both, RUNS)):
        features = dataset.features
        assert [features[c].dtype for c in ("source_uri", "page", "source_size", "truncated", "generate_s")] == \
            ["string", "int32", "int64", "bool", "float32"]
        rows = dataset.to_list()
        assert sorted(tuple(r[c] for c in COMPARED) for r in rows) == reference(outputs, runs)
        assert_nulls_where_rows_have_no_value(rows)


def test_polars(outputs):
    import polars as pl

    one = pl.read_parquet(f"{outputs}/run_id=monday/*.parquet")
    both = pl.scan_parquet(f"{outputs}/*/*.parquet", hive_partitioning=True).collect()
    for frame, runs in ((one, RUNS[:1]), (both, RUNS)):
        assert [frame.schema[c] for c in ("source_uri", "page", "source_size", "truncated", "generate_s")] == \
            [pl.String, pl.Int32, pl.Int64, pl.Boolean, pl.Float32]
        rows = frame.to_dicts()
        assert sorted(tuple(r[c] for c in COMPARED) for r in rows) == reference(outputs, runs)
        assert_nulls_where_rows_have_no_value(rows)
    assert both.group_by("run_id").len().sort("run_id")["run_id"].to_list() == list(RUNS)


def test_duckdb(outputs):
    import duckdb

    for pattern, runs in ((f"{outputs}/run_id=monday/*.parquet", RUNS[:1]), (f"{outputs}/*/*.parquet", RUNS)):
        relation = duckdb.sql(f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)")
        types = dict(zip(relation.columns, map(str, relation.types)))
        assert [types[c] for c in ("source_uri", "page", "source_size", "truncated", "generate_s")] == \
            ["VARCHAR", "INTEGER", "BIGINT", "BOOLEAN", "FLOAT"]
        rows = [dict(zip(relation.columns, values)) for values in relation.fetchall()]
        assert sorted(tuple(r[c] for c in COMPARED) for r in rows) == reference(outputs, runs)
        assert_nulls_where_rows_have_no_value(rows)
    per_run = duckdb.sql(f"SELECT run_id, count(*) FROM read_parquet('{outputs}/*/*.parquet', "
                         "hive_partitioning = true) GROUP BY run_id ORDER BY run_id").fetchall()
    assert [run for run, _ in per_run] == list(RUNS)
