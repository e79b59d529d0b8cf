"""Degenerate generations: one phrase repeated until the token budget ran out is flagged, and optionally
generated again with a temperature ramp."""

from __future__ import annotations

import json

import pytest

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, TaskSpec
from scriptorium.pipeline.model.degenerate import is_degenerate, repeated_tail
from tests.conftest import job, make_pdf, plan_row, run_stages

PHRASE = [17, 4, 99, 4, 23]  # a "phrase" of token ids; 4 repeats inside it on purpose


def test_the_repeated_tail_is_found_with_its_shortest_period():
    assert repeated_tail([1, 2, 3] + [7] * 10) == (1, 10)
    assert repeated_tail([5, 6] + PHRASE * 4) == (5, 20)
    assert repeated_tail([5, 6] + PHRASE * 4 + PHRASE[:2]) == (5, 22)  # cut mid-phrase by the budget
    assert repeated_tail([1, 2, 3, 4, 5, 6]) == (0, 0)
    assert repeated_tail([]) == (0, 0)


def test_a_loop_that_runs_until_the_budget_is_degenerate():
    assert is_degenerate(list(range(40)) + PHRASE * 4, finished=False)
    assert is_degenerate([3] * 16, finished=False)
    assert is_degenerate("The total is 12. " + "Page 1 of 1. " * 6, finished=False)  # works on text too


def test_an_output_that_ended_by_itself_is_never_degenerate():
    assert not is_degenerate(list(range(40)) + PHRASE * 4, finished=True)


def test_too_few_repeats_or_too_short_a_tail_is_not_degenerate():
    assert not is_degenerate(list(range(40)) + PHRASE * 2, finished=False)  # twice: could be the text
    assert not is_degenerate([9] * 10, finished=False)  # 10 tokens: too little to judge
    assert not is_degenerate(list(range(60)), finished=False)  # truncated, but not repeating
    assert not is_degenerate(PHRASE * 6 + [1, 2, 3], finished=False)  # the loop ended before the budget


def test_a_phrase_longer_than_max_period_is_not_looked_for():
    long_phrase = list(range(100, 170))
    assert is_degenerate(long_phrase * 3, finished=False, max_period=80)
    assert not is_degenerate(long_phrase * 3, finished=False, max_period=64)


def test_a_temperature_ramp_must_hold_temperatures():
    with pytest.raises(SpecError, match="temperature_ramp"):
        JobSpec(input=InputSpec(uri="in"), output=OutputSpec(uri="out"), model=ModelSpec(id="m"),
                tasks=[TaskSpec(temperature_ramp=[0.5, 0])]).check_runnable()


# -- in the model stage, with a tiny checkpoint that loops on its own (greedy, it repeats one token pair) --
@pytest.fixture(scope="module")
def looping_model(tmp_path_factory):
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "looping", image_sensitive=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return make_pdf(tmp_path_factory.mktemp("degenerate") / "page.pdf", ["A page of text."])


def test_the_model_stage_flags_a_loop_in_the_degenerate_column(looping_model, page):
    (row,) = run_stages(job(looping_model, [TaskSpec(kind="ocr", max_new_tokens=32)]), [plan_row(page)])
    assert row["status"] == "ok" and row["truncated"]
    assert row["degenerate"] is True
    assert is_degenerate(row["text"], finished=False)  # the text shows the loop too


def test_the_model_stage_does_not_flag_an_output_too_short_to_judge(looping_model, page):
    (row,) = run_stages(job(looping_model, [TaskSpec(kind="ocr", max_new_tokens=8)]), [plan_row(page)])
    assert row["degenerate"] is False


def test_a_temperature_ramp_replaces_a_degenerate_output_with_a_sampled_one(looping_model, page):
    task = TaskSpec(kind="ocr", max_new_tokens=32, temperature_ramp=[1e-6, 5.0])
    (row,) = run_stages(job(looping_model, [task]), [plan_row(page)])
    # At 1e-6 sampling is greedy and loops again; at 5.0 the random model stops looping.
    assert row["degenerate"] is False and row["status"] == "ok"
    assert json.loads(row["generation"]) | {"do_sample": True, "temperature": 5.0} == json.loads(row["generation"])


def test_a_retry_that_loops_again_leaves_the_first_output(looping_model, page):
    greedy = TaskSpec(kind="ocr", max_new_tokens=32)
    (first,) = run_stages(job(looping_model, [greedy]), [plan_row(page)])
    (row,) = run_stages(job(looping_model, [TaskSpec(kind="ocr", max_new_tokens=32, temperature_ramp=[1e-6])]),
                        [plan_row(page)])
    assert row["degenerate"] is True and row["text"] == first["text"]
    assert json.loads(row["generation"])["do_sample"] is False
