"""Only our own files (connectors/namespace.py): `--overwrite` removes exactly the output's own files and
leaves everything else where it was, with one warning; an output folder inside its input folder is never
read back as input; the ledger reads only our files."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scriptorium.connectors.ledger import read_ledger
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.spec import spec_from_dict
from scriptorium.jobs.runner import run_job
from tests.conftest import make_image, make_pdf, read_rows, small_ocr_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("namespace-inputs")
    make_pdf(folder / "letter.pdf", ["Dear reader,", "Yours."], size=(200, 260))
    make_image(folder / "map.png")
    return folder


def run(input_uri, output_uri, model, run_id: str, **output_settings):
    job = small_ocr_job(input_uri, output_uri, model)
    job["output"].update(output_settings)
    job["run_id"] = run_id
    return run_job(spec_from_dict(job))


def test_overwrite_removes_only_our_files_and_names_the_others_once(documents, tiny_model, tmp_path, ray_local, caplog):
    output = tmp_path / "out"
    first = run(documents, output, tiny_model, "first")
    # Beside our results: a user's table, another job's partition below, and a file named like ours
    # that no run of this output wrote (copied from elsewhere).
    foreign = {
        "users-table.parquet": pa.table({"id": [1, 2], "note": ["keep", "me"]}),
        "other-job/run_id=7/part-0.parquet": pa.table({"x": [7]}),
        "part-copied-000000-0badf00d.parquet": pa.table({"y": [3]}),
    }
    for name, table in foreign.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, output / name)
    before = {name: (output / name).read_bytes() for name in foreign}
    store = ParquetStore(str(output))
    assert sorted(store.data_files()) == sorted(first.files)  # the ledger's input: ours only
    assert read_ledger(store, {("ocr", None)}).n_rows == first.rows_written

    caplog.set_level(logging.WARNING)
    second = run(documents, output, tiny_model, "second", overwrite=True)

    assert {name: (output / name).read_bytes() for name in foreign} == before  # untouched, byte for byte
    assert not any(Path(path).exists() for path in first.files)  # ours went...
    assert second.planned_inputs == 2 and sorted(store.data_files()) == sorted(second.files)  # ...and were redone
    warnings = [r.getMessage() for r in caplog.records if "--overwrite left" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"--overwrite left 3 file(s) in {output} that this output did not write: ")
    assert all(name in warnings[0] for name in foreign)


@pytest.mark.parametrize("output_name, planned", [
    ("results", (2, 1, 2)),  # one output: the second run does only the new input
    ("results/run_id={run_id}", (2, 3, 0)),  # a partition per run: the second run's is new, and empty
])
def test_an_output_inside_its_input_is_never_read_back_as_input(output_name, planned, documents, tiny_model, tmp_path,
                                                                 ray_local):
    inputs = tmp_path / "archive"
    inputs.mkdir()
    for path in documents.iterdir():
        (inputs / path.name).write_bytes(path.read_bytes())

    first = run(inputs, inputs / output_name, tiny_model, "first")
    (inputs / "later.png").write_bytes((documents / "map.png").read_bytes())  # new input arrives
    again = run(inputs, inputs / output_name, tiny_model, "again")

    assert (first.planned_inputs, again.planned_inputs, again.skipped_inputs) == planned
    rows = read_rows(Path(again.output))
    assert sorted({Path(r["source_uri"]).name for r in rows}) == ["later.png", "letter.pdf", "map.png"]
    assert not [r for r in rows if r["source_uri"].startswith(str(inputs / "results"))]
    assert {r["status"] for r in rows} == {"ok"}
