"""Which files in an output folder are Scriptorium's own: the name rule and the output's file list.

An output folder may hold more than our results: a user's table beside them, another job's partition
below them, the input itself when the output is its parent. The sink reads, rewrites and deletes only
its own files, which are the files directly in the output folder that are

- listed in `_scriptorium/files.json`, or
- named `part-<run_id>-<NNNNNN>-<8 hex digits>.parquet` by a run listed there. These are the files
  published since the list was last written, so a run killed between publishing a file and listing it
  loses nothing: the next run's reconciliation lists it.

The list is rewritten whole and atomically, by the run holding the output's lease only (see
connectors/lease.py): when a run starts (its run id added, the list reconciled with what exists) and
when it ends. An output written before file lists existed has none; there every file named like ours
directly in the folder is ours, and the first run lists them.

    _scriptorium/files.json   {"format": 1, "runs": ["20261201-101500-ab12", ...], "files": ["part-...", ...]}

Scriptorium's bookkeeping lives under names that start with `_` (`_scriptorium/`, `_work/`, `_runs/`,
`_summary.json`), and temporaries start with `.` and carry the lease token of the run that wrote them
(`.NAME.<token>.<nonce>.tmp`), so a run can tell its own from those a killed run left behind.
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from dataclasses import dataclass, field

FOLDER = "_scriptorium"  # the output's own bookkeeping: the lease and the file list
FILE_LIST = f"{FOLDER}/files.json"
LEASE_FILE = f"{FOLDER}/lease.json"  # connectors/lease.py
FILE_LIST_FORMAT = 1
WORK_FOLDER = "_work"  # plan files of running runs, one folder per run and lease
BOOKKEEPING = (WORK_FOLDER, "_runs", "_summary.json")  # what --overwrite clears besides the data files

DATA_FILE = re.compile(r"part-(?P<run>[A-Za-z0-9_-]{1,64})-\d{6,}-[0-9a-f]{8}\.parquet")
# `.NAME.<writer token>.<nonce>.tmp`; files of Scriptorium before leases have no token.
TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(?:(?P<writer>[0-9a-f]{12})\.)?[0-9a-f]{8}\.tmp")


def data_file_name(run_id: str, sequence: int) -> str:
    """The name of a run's `sequence`-th published file (unique: a random suffix)."""
    return f"part-{run_id}-{sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"


def temporary_name(name: str, writer: str) -> str:
    """The hidden name a file is written under before it is moved into place as `name`."""
    return f".{name}.{writer + '.' if writer else ''}{uuid.uuid4().hex[:8]}.tmp"


def temporary_writer(name: str) -> str | None:
    """The lease token in the name of one of our temporaries ("" for one written before leases); None if
    `name` is not the temporary of a data file, the file list or the lease."""
    match = TEMPORARY.fullmatch(name)
    if match is None:
        return None
    final = match["name"]
    if not (DATA_FILE.fullmatch(final) or final in (posixpath.basename(FILE_LIST), posixpath.basename(LEASE_FILE))):
        return None
    return match["writer"] or ""


def work_folder_name(run_id: str, writer: str) -> str:
    """`_work/` entry of a run's plan files: its run id and lease token (a resumed run id gets a new one)."""
    return f"{run_id}.{writer}" if writer else run_id


def work_folder_writer(name: str) -> str:
    return name.rpartition(".")[2] if "." in name else ""


@dataclass(frozen=True)
class OwnFiles:
    """A snapshot of the rule for one output: which names directly in `folder` (a URI) are ours."""

    folder: str
    runs: frozenset[str] = field(default_factory=frozenset)
    names: frozenset[str] = field(default_factory=frozenset)
    listed: bool = False  # False: the output has no file list yet, every name of our form is ours

    def owns(self, name: str) -> bool:
        if name in self.names:
            return True
        match = DATA_FILE.fullmatch(name)
        return match is not None and (not self.listed or match["run"] in self.runs)

    def owns_uri(self, uri: str) -> bool:
        folder, _, name = uri.rpartition("/")
        return folder == self.folder and self.owns(name)

    def with_run(self, run_id: str) -> OwnFiles:
        return OwnFiles(self.folder, self.runs | {run_id}, self.names, self.listed)


class FileListError(ValueError):
    """`_scriptorium/files.json` is not a file list this version can read."""


def parse_file_list(folder: str, data: bytes | None) -> OwnFiles:
    """The rule from the bytes of the file list (None: there is none)."""
    if data is None:
        return OwnFiles(folder)
    try:
        listing = json.loads(data)
        if listing.get("format") != FILE_LIST_FORMAT:
            raise FileListError(f"format {listing.get('format')!r}, this version reads {FILE_LIST_FORMAT}")
        runs, names = listing["runs"], listing["files"]
        if not all(isinstance(item, str) for item in [*runs, *names]):
            raise FileListError("runs and files must be lists of names")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise FileListError(str(exc)) from None
    return OwnFiles(folder, frozenset(runs), frozenset(names), listed=True)


def file_list_bytes(own: OwnFiles, names: list[str]) -> bytes:
    """The file list of `own`'s runs, listing `names` (the own files that exist now)."""
    listing = {"format": FILE_LIST_FORMAT, "runs": sorted(own.runs), "files": sorted(names)}
    return json.dumps(listing, indent=1).encode()
