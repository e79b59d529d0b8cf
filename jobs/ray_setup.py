"""Ray for a run: which cluster it joins (or the local Ray it starts), and how Ray Data runs its dataset.

Everything comes from `[resources]` (core/spec.py), the environment included: `scriptorium run` reads
SCRIPTORIUM_RAY_ADDRESS and SCRIPTORIUM_RAY_PROGRESS into it, so nothing here reads the environment.
"""

from __future__ import annotations

import logging
import os
import sys

import ray

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import ResourceSpec
from scriptorium.jobs.block_stats import bound_block_stats
from scriptorium.jobs.logs import (
    adopt_stream_handlers,
    current_run_id,
    json_active,
    worker_lines_as_json,
    worker_setup_hook,
)
from scriptorium.pipeline.model.loading import gpus_in_cluster

UNSCHEDULABLE = "scriptorium-never-scheduled"  # a resource no node has: an actor asking for it never starts


def ray_address(resources: ResourceSpec) -> str:
    """The cluster to join ("" for a local Ray). A Ray Client address (ray://) is refused up front:
    Ray Data cannot run through Ray Client (ray-project/ray#48682), so a job is driven from inside
    the cluster instead, which is what `scriptorium submit` arranges."""
    address = resources.address
    if address.startswith("ray://"):
        raise SpecError(f"address {address}: Ray Data cannot run through Ray Client (ray://). Submit the job "
                        "to the cluster instead: scriptorium submit --address http://HEAD:8265 --job FILE.toml, "
                        "or run it on a cluster node with --address auto")
    return address


def init_ray(resources: ResourceSpec) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray_address(resources)
    json_logs = worker_logging()
    if address:
        ray.init(address=address, **json_logs)
        forward_worker_logs_as_json()
        return
    # Ray schedules by logical CPUs. With as many as cores, one model actor plus render tasks can
    # leave no CPU for Ray Data's own read/write tasks on a 2-core machine and the job stalls, so a
    # local Ray gets at least 4 logical CPUs; the OS shares the real cores between them.
    num_cpus = resources.ray_num_cpus or max(4, os.cpu_count() or 1)
    # address="local": a Ray of our own, never one found on the machine (a plain ray.init() joins the
    # cluster `ray start` recorded in /tmp/ray). Its processes die with this driver (Ray ties them to
    # it), so a killed run leaves nothing behind that could disturb its rerun.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=True,
             logging_level=logging.WARNING, **json_logs)
    forward_worker_logs_as_json()
    spend_actor_restart_warning()  # a false alarm Ray would print in the middle of the progress lines


def worker_logging() -> dict:
    """ray.init's options for the workers' output. Text logs (the default): the workers' output stays in
    Ray's log files (`/tmp/ray/session_latest/logs`), out of the progress line. JSON logs (jobs/logs.py):
    each worker logs its warnings and errors as JSON lines, and Ray forwards them to the driver."""
    if not json_active():
        return {"log_to_driver": False}
    return {"log_to_driver": True,
            "runtime_env": {"worker_process_setup_hook": worker_setup_hook(current_run_id())}}


def forward_worker_logs_as_json() -> None:
    """With JSON logs, the lines Ray forwards from the workers are written as JSON objects
    (`worker_lines_as_json`) instead of Ray's "(pid=...)" prefixed lines; the libraries' console handlers
    Ray set up format as JSON too."""
    if not json_active():
        return
    from ray._private.worker import global_worker_stdstream_dispatcher  # Ray's own hook for the lines

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("scriptorium_json", worker_lines_as_json)
    adopt_stream_handlers()


def joined_cluster_gpus(resources: ResourceSpec) -> float:
    """The GPUs of the cluster this run joins, for derive to decide device = "auto": Ray is started (or
    joined) here only when derive asks, after its checks, so a job that fails them never waits for Ray."""
    init_ray(resources)
    return gpus_in_cluster()


def tune_ray_data(ctx, resources: ResourceSpec) -> None:
    """Set up the DataContext `ctx` for a run's dataset; call it before the dataset is made, which
    keeps a copy of the context."""
    ctx.max_errored_blocks = 0  # never drop a block silently: failures are rows, not lost blocks
    bound_block_stats(ctx)  # Ray Data keeps a record per output block in the driver: only the latest
    # Bounded in-flight work, so memory stays flat from 500 pages to 5 million: the listing streams into
    # plan files; Ray Data starts tasks for a stage only while its output fits the stage's share of the
    # object-store budget (resource_limits: by default half the cluster's object store, re-read as nodes
    # join or leave, so it grows with the cluster, never with the input); each model replica holds at
    # most two batches (pipeline/processor.py). Ordered output would have to buffer every page finished
    # behind a slow one, so results leave in completion order (the Parquet keys say where rows belong).
    ctx.execution_options.preserve_order = False
    if not resources.ray_progress or json_active():  # the bars are no JSON lines
        quiet_ray_data_progress(ctx)


def quiet_ray_data_progress(ctx) -> None:
    """Our progress line replaces Ray Data's bars (which would garble it on a terminal) and its
    per-operator log blocks (every few seconds in CI logs)."""
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)  # "finished in"


class _Placeholder:
    def __init__(self, argument):
        pass


def spend_actor_restart_warning() -> None:
    """Keep one false alarm of Ray's out of the user's terminal.

    Ray Data starts every actor pool (our model replicas) with max_restarts = -1 and hands each actor its
    DataContext and its map function as ObjectRefs, which Ray Data holds for the pool's lifetime. On the
    first such actor, the driver's core worker logs at ERROR level, straight to the process's stderr, that
    a restart would fail if those objects were lost (ray-project/ray#53727): never the case here, and the
    only "E" line a run prints. No setting turns that one line off: RAY_BACKEND_LOG_LEVEL=fatal would hide
    every C++ error of the driver and prints a line of its own to say so, and log_to_driver concerns the
    workers' output, not the driver's. The line is logged once per process (RAY_LOG_ONCE_PER_PROCESS), so
    a run on its own local Ray spends that once here, on an actor that meets the warning's conditions and
    is never scheduled, with stderr pointed away for the one call that logs it.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        actor = ray.remote(_Placeholder).options(num_cpus=0, max_restarts=1, resources={UNSCHEDULABLE: 1}).remote(
            ray.put(None))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)
