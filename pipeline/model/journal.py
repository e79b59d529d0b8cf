"""The crash journal: how a restarted model replica finds the page that killed its predecessor.

Ray restarts a model actor that dies (the OOM killer, a CUDA fault, a segfault, a killed process) and
retries the batch it was working on. If one page kills the process, every retry dies the same way,
forever. So before each `generate` call a replica notes the units it is about to generate (`in_flight`)
and clears the note when the call returns or raises. A replica that starts and finds a note knows its
predecessor died inside that call: every unit in the note counts one crash.

The model stage then isolates suspects (stage.py): a batch holding a unit that was in flight
at a crash is split in halves, down to single units, so the next crash names one unit; a unit that
crashed the replica while generated alone, and at least twice in all, becomes an error row instead of
a third attempt. A page that kills its replica costs two restarts (one with its batch, one alone); its
batch mates are generated one at a time, once, and come out ok.

The note is a small JSON file on the replica's node, named after the Ray actor id (an actor keeps its id
across restarts). Outside a Ray actor nothing restarts a replica, so there is no journal.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path


POISON_AFTER = 2  # crashes (at least one with the unit alone) after which a unit is not tried again


def journal_folder(run_id: str) -> Path:
    """Where a run's replicas keep their journals on a node."""
    return Path(tempfile.gettempdir()) / "scriptorium-crash-journal" / (run_id or "run")


class CrashJournal:
    def __init__(self, path: Path):
        self.path = path
        state = json.loads(path.read_text()) if path.exists() else {}
        self.crashes = Counter(state.get("crashes", {}))  # unit -> crashes it was in flight for
        self.alone = Counter(state.get("alone", {}))  # unit -> crashes while it was generated alone
        died_during = state.get("in_flight") or []
        for key in died_during:
            self.crashes[key] += 1
        if len(died_during) == 1:
            self.alone[died_during[0]] += 1
        self.restarted_after_crash = bool(died_during)
        self._running: Counter = Counter()  # unit -> calls in flight that hold it
        self._lock = threading.Lock()
        self._save([])

    def is_suspect(self, key: str) -> bool:
        return self.crashes[key] > 0

    def is_poison(self, key: str) -> bool:
        return self.alone[key] > 0 and self.crashes[key] >= POISON_AFTER

    def poison_reason(self, key: str) -> str:
        return (f"the model replica died {self.crashes[key]} times while generating this page "
                f"({self.alone[key]} times with the page alone in its batch): not tried again")

    @contextmanager
    def in_flight(self, keys: list[str]):
        """Note `keys` for the duration of a generate call. A Python exception clears the note like a
        return does; only a process that dies leaves it behind. Calls may overlap (the continuous engine
        notes each request while it runs, beside a static fallback batch): the note is their union."""
        with self._lock:
            self._running.update(keys)
            self._save(sorted(self._running))
        try:
            yield
        finally:
            with self._lock:
                self._running.subtract(keys)
                self._running = +self._running  # drop the keys no call holds any more
                self._save(sorted(self._running))

    def _save(self, in_flight: list[str]) -> None:
        state = {"pid": os.getpid(), "in_flight": in_flight, "crashes": self.crashes, "alone": self.alone}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.path)  # a reader (or a successor) never sees half a note


def ray_context():
    """Ray's runtime context where this code runs under Ray, else None: the model stage also runs
    without Ray, or on a machine without it (bench/gpu_suite.py on a GPU machine)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context() if ray.is_initialized() else None


def journal_for_this_replica(run_id: str) -> CrashJournal | None:
    """The journal of the Ray actor this code runs in, or None outside one."""
    try:
        context = ray_context()
        actor_id = context.get_actor_id() if context is not None else None
    except Exception:
        actor_id = None
    if not actor_id:
        return None
    return CrashJournal(journal_folder(run_id) / f"{actor_id}.json")
