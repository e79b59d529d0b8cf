"""Ray Data's per-block statistics stay bounded in the driver however many blocks a run outputs."""

from __future__ import annotations

import re

import pytest

from scriptorium.jobs import block_stats

pytestmark = pytest.mark.slow


@pytest.fixture
def data_context(ray_local):
    ctx = ray_local.data.DataContext.get_current()
    saved = list(ctx.custom_execution_callback_classes), ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    # A job run earlier in this process (run_job) bounded this context already: start unbounded.
    ctx.custom_execution_callback_classes[:] = [c for c in saved[0] if c is not block_stats.BoundedBlockStats]
    yield ctx
    ctx.custom_execution_callback_classes[:], ctx.enable_progress_bars = saved


def blocks_in_stats(dataset) -> list[int]:
    """The "N blocks produced" of each operator in Dataset.stats(): how many block records it kept."""
    return [int(n) for n in re.findall(r"(\d+) blocks produced", dataset.stats())]


def test_each_operator_keeps_only_the_latest_block_statistics(data_context, monkeypatch):
    import ray

    monkeypatch.setattr(block_stats, "KEPT_BLOCK_STATS", 2)

    def forty_blocks():  # a dataset keeps a copy of the DataContext as it was when it was made
        return ray.data.range(200, override_num_blocks=40).map_batches(lambda batch: batch, batch_size=None)

    plain = forty_blocks()
    block_stats.bound_block_stats(data_context)
    block_stats.bound_block_stats(data_context)  # twice is once
    assert data_context.custom_execution_callback_classes.count(block_stats.BoundedBlockStats) == 1
    bounded = forty_blocks()
    for dataset in (plain, bounded):
        assert sum(len(batch["id"]) for batch in dataset.iter_batches(batch_size=None)) == 200
    assert blocks_in_stats(plain) == [40]
    assert blocks_in_stats(bounded) and all(n <= 4 for n in blocks_in_stats(bounded))  # the latest only
