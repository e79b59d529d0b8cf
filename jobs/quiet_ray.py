"""Keeps one false alarm of Ray's out of the user's terminal.

Ray Data starts every actor pool (our model replicas) with max_restarts = -1 and hands each actor its
DataContext and its map function as ObjectRefs, which Ray Data holds for the pool's lifetime. On the
first such actor, the driver's core worker logs at ERROR level, straight to the process's stderr, that a
restart would fail if those objects were lost (ray-project/ray#53727): never the case here, and the only
"E" line a run prints. No setting turns that one line off: RAY_BACKEND_LOG_LEVEL=fatal would hide every
C++ error of the driver and prints a line of its own to say so, and log_to_driver concerns the workers'
output, not the driver's. The line is logged once per process (RAY_LOG_ONCE_PER_PROCESS), so a run on
its own local Ray spends that once on an actor that is never scheduled, with stderr pointed away for
the one call that logs it.
"""

from __future__ import annotations

import os
import sys

import ray

UNSCHEDULABLE = "scriptorium-never-scheduled"  # a resource no node has: the actor is never started


class _Placeholder:
    def __init__(self, argument):
        pass


def spend_actor_restart_warning() -> None:
    """Create (and kill) one actor that meets the warning's conditions, its log line sent to /dev/null."""
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
