"""The job spec: one typed source of configuration, loaded from TOML, checked before anything runs."""

from __future__ import annotations

import json

import pytest

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import load_spec, spec_from_dict
from scriptorium.jobs.cli import build_parser, spec_from_args
from tests.conftest import one_line_error, run_cli

JOB = '[input]\nuri = "in"\n[output]\nuri = "out"\n[model]\nid = "m"\n[[tasks]]\nkind = "ocr"\n'


def test_toml_spec_loads_into_typed_sections(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'run_id = "r1"\n[input]\nuri = "s3://b/in/"\nexclude = ["*.tmp"]\n[output]\nuri = "out"\n'
        '[model]\nid = "m"\ndtype = "bf16"\ndo_image_splitting = true\n'
        '[[tasks]]\nkind = "ocr"\n[[tasks]]\nkind = "qa"\nquestions = ["Who?", "When?"]\nmax_new_tokens = 64\n'
    )
    spec = load_spec(path).check_runnable()
    assert spec.input.exclude == ["*.tmp"]
    assert spec.model.dtype == "bf16" and spec.model.do_image_splitting is True
    assert [t.task_name for t in spec.tasks] == ["ocr", "qa"]
    assert spec.tasks[1].questions == ["Who?", "When?"] and spec.tasks[1].max_new_tokens == 64


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(SpecError, match="unknown setting.*dtpye"):
        spec_from_dict({"model": {"id": "m", "dtpye": "bf16"}})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"id": ""}}, "no model"),
        ({"model": {"id": "m", "dtype": "fp8"}}, "model.dtype"),
        ({"tasks": [{"kind": "qa"}]}, "needs a question"),
        ({"tasks": [{"kind": "ocr"}, {"kind": "ocr"}]}, "two tasks are named"),
        ({"output": {"uri": "o", "overwrite": True, "retry_failed": True}}, "contradict"),
    ],
)
def test_validation_names_the_problem(change, message):
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"id": "m"}, "tasks": [{"kind": "ocr"}]}
    data.update(change)
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data).check_runnable()


def test_flags_override_the_job_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[input]\nuri = "a"\n[output]\nuri = "b"\n[model]\nid = "m"\n[[tasks]]\nkind = "caption"\n')
    args = build_parser().parse_args(
        ["run", "--job", str(path), "--output", "c", "--max-new-tokens", "7", "--device", "cpu", "--no-image-splitting"]
    )
    spec = spec_from_args(args).check_runnable()
    assert spec.input.uri == "a" and spec.output.uri == "c"
    assert spec.tasks[0].kind == "caption" and spec.tasks[0].max_new_tokens == 7
    assert spec.model.device == "cpu" and spec.model.do_image_splitting is False


def test_routing_and_batch_budgets_are_flags_too(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[input]\nuri = "a"\n[output]\nuri = "b"\n[model]\nid = "m"\n[[tasks]]\nkind = "ocr"\n'
                    '[routing]\ndedup = true\n[resources]\nbatch_size = 32\n')
    args = build_parser().parse_args(["run", "--job", str(path), "--text-layer", "--ocr-engine", "tesseract",
                                      "--no-dedup", "--max-batch-tokens", "50000"])
    spec = spec_from_args(args).check_runnable()
    assert (spec.routing.text_layer, spec.routing.ocr_engine, spec.routing.dedup) == (True, "tesseract", False)
    assert (spec.resources.batch_size, spec.resources.max_batch_tokens) == (32, 50000)  # the file's, and the flag's
    assert not spec.needs_model  # Tesseract answers every OCR page: no model, no GPU


@pytest.mark.slow
def test_what_the_driver_derives_is_not_a_setting(tmp_path):
    """Whether PDF pages get even edges that halve to the model's size is the driver's to decide, from the
    checkpoint (pipeline/render/size.py): a job file cannot set it, and the JSON Schema does not offer it."""
    job = tmp_path / "job.toml"
    job.write_text(JOB + "[render]\nhalvable = true\n")
    one_line_error(run_cli("run", "--job", str(job)), "unknown setting(s) in [render]: halvable")
    schema = run_cli("schema")
    assert schema.returncode == 0, schema.stderr[-2000:]
    assert "page_edge" in json.loads(schema.stdout)["$defs"]["RenderSpec"]["properties"]
    assert "halvable" not in schema.stdout


@pytest.mark.slow
def test_each_edge_setting_has_one_name(tmp_path):
    """`[render] page_edge` is a rendered page's size, `[model] longest_edge` the processor's image size: a
    job file that still says `[render] longest_edge` fails, naming the key to write instead."""
    job = tmp_path / "job.toml"
    job.write_text(JOB + "[render]\nlongest_edge = 1960\n")
    one_line_error(run_cli("run", "--job", str(job)), "[render] longest_edge is named page_edge",
                   "[render] page_edge = 1960")
    job.write_text(JOB.replace('id = "m"', 'id = "m"\nlongest_edge = 490') + "[render]\npage_edge = 1960\n")
    spec = load_spec(job)
    assert (spec.model.longest_edge, spec.render.page_edge) == (490, 1960)
