"""Ray Data's per-block statistics, bounded: without this the driver grows with every block of a run.

Each of Ray Data's map operators (in the driver's StreamingExecutor) appends a `BlockStats` record for
every block it outputs to `_output_blocks_stats`, a plain list kept for `Dataset.stats()` and the
summary logged when execution ends; no DataContext setting turns it off. Our operators output about
one block per page or per model batch, so over 10^7 pages that is gigabytes of records nobody reads
(measured: ~1 KB per output block, the bulk of the driver's ~2.5 KB per page growth in BENCHMARKS.md).

An execution callback, registered on the DataContext before the dataset is made, trims each operator's
list to its last KEPT_BLOCK_STATS records as execution goes (at each step of the executor's loop, in
the executor's own thread): `Dataset.stats()` then describes the latest blocks only, which is all a
stalled-operator investigation needs. The list is trimmed in place, not replaced by a bounded deque:
Ray Data hands the very list to its stats actor from another thread, and pickling a deque that is
being appended to fails ("deque mutated during iteration"), while a list is read as it stands.
`_topology` and `_output_blocks_stats` are Ray Data internals (ray==2.60.0 is pinned);
tests/test_block_stats.py checks on a real Ray that they are still where this expects them. The
callback's class travels to Ray's workers with the DataContext, so it lives in an installed module.
"""

from __future__ import annotations

from ray.data._internal.execution.execution_callback import ExecutionCallback

KEPT_BLOCK_STATS = 1000  # per operator


class BoundedBlockStats(ExecutionCallback):
    def on_execution_step(self, executor) -> None:
        for op in executor._topology:
            records = getattr(op, "_output_blocks_stats", None)
            if isinstance(records, list) and len(records) > 2 * KEPT_BLOCK_STATS:  # trimmed in bulk
                del records[:-KEPT_BLOCK_STATS]


def bound_block_stats(ctx) -> None:
    """Keep only the latest block statistics in executions started with this DataContext."""
    if BoundedBlockStats not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(BoundedBlockStats)
