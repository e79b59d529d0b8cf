"""Ray Data's per-block statistics stay bounded in the driver however many blocks a run outputs."""

from __future__ import annotations

import pytest

from jobs import block_stats


class RecordExecutor(block_stats.ExecutionCallback):
    """Keeps the executor of the last execution, to look at its operators afterwards."""

    executors: list = []

    def after_execution_succeeds(self, executor) -> None:
        RecordExecutor.executors.append(executor)


@pytest.fixture
def data_context(ray_local):
    ctx = ray_local.data.DataContext.get_current()
    saved = list(ctx.custom_execution_callback_classes)
    yield ctx
    ctx.custom_execution_callback_classes[:] = saved


def test_each_operator_keeps_only_the_latest_block_statistics(data_context, monkeypatch):
    import ray
    from ray.data._internal.execution.operators.map_operator import MapOperator

    monkeypatch.setattr(block_stats, "KEPT_BLOCK_STATS", 5)
    data_context.enable_progress_bars = False
    block_stats.bound_block_stats(data_context)
    block_stats.bound_block_stats(data_context)  # twice is once
    data_context.custom_execution_callback_classes.append(RecordExecutor)
    assert data_context.custom_execution_callback_classes.count(block_stats.BoundedBlockStats) == 1

    dataset = ray.data.range(200, override_num_blocks=40).map_batches(lambda batch: batch, batch_size=None)
    assert sum(len(batch["id"]) for batch in dataset.iter_batches(batch_size=None)) == 200
    operators = [op for op in RecordExecutor.executors[-1]._topology if isinstance(op, MapOperator)]
    assert operators and all(len(op._output_blocks_stats) == 5 for op in operators)  # 40 blocks went through
    assert "MapBatches" in dataset.stats()  # Dataset.stats() still works, on the latest blocks
