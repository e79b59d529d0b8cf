"""`scriptorium status OUTPUT`: where an output stands, from any machine that can read it.

Everything comes from the output itself, so the machine asking needs no Ray and no access to the run's:

- the lease (`_scriptorium/lease.json`, connectors/lease.py): whether a run holds the output, its run id,
  host, pid and heartbeat age, and whether that holder is provably gone (a stale lease);
- the plan record of the run's latest attempt (`_runs/<run_id>/plan.json`, jobs/summary_files.py): the
  documents it planned, when, and what the run id had published before it;
- the published Parquet rows of the run, counted by jobs/tally.py in bounded memory: documents, pages
  and rows by status, tokens, errors by reason;
- the run's summary (`_runs/<run_id>/summary.json`), once it has finished.

While a run holds the lease, its rate is the pages it has published since its planning ended over the
time since, and its ETA the progress line's (jobs/progress.py), over the documents it planned.

The state, and the exit status a scheduler acts on:

    finished  0   no run holds the lease and the latest run finished (it wrote its summary)
    running   3   a run holds the lease and is alive
    stale     4   a lease is left by a run that is provably gone; the next run takes it over
    stopped   5   no run holds the lease, but the latest run ended without finishing (an error, a
                  stop); rerunning its run id resumes it

and 2, as for every command, when the output cannot be read or holds no Scriptorium results.
"""

from __future__ import annotations

import time

from scriptorium.connectors.lease import gone_reason, read_lease
from scriptorium.connectors.namespace import LEASE_FILE
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.core.redaction import redact_uri
from scriptorium.core.spec import OutputSpec
from scriptorium.jobs.progress import eta_seconds
from scriptorium.jobs.summary_files import read_run_plans, read_run_summaries
from scriptorium.jobs.summary_text import count_lines, format_duration
from scriptorium.jobs.tally import tally_run

EXIT_CODES = {"finished": 0, "running": 3, "stale": 4, "stopped": 5}
DEFAULT_LEASE_TIMEOUT_S = OutputSpec().lease_timeout_s


def output_status(store: ParquetStore, lease_timeout_s: float | None = None, now: float | None = None) -> dict:
    """The status of `store`'s output (see the module's docstring). `lease_timeout_s`: the timeout a
    lease is judged stale by when it does not record its own (a run of an older Scriptorium)."""
    now = time.time() if now is None else now
    has_lease, holder = read_lease(store.fs, store.root)
    plans = {p["run_id"]: p for p in read_run_plans(store)}
    summaries = {s["run_id"]: s for s in read_run_summaries(store)}
    lease = None
    if has_lease:
        timeout = (holder.timeout_s if holder and holder.timeout_s else None) or lease_timeout_s \
            or DEFAULT_LEASE_TIMEOUT_S
        reason = gone_reason(holder, timeout, now)
        state = "stale" if reason else "running"
        lease = {"run_id": holder.run_id, "host": holder.host, "pid": holder.pid,
                 "held_for_s": round(max(0.0, now - holder.started), 1),
                 "heartbeat_age_s": round(max(0.0, now - holder.heartbeat), 1),
                 "timeout_s": timeout} if holder else {"run_id": None}
        lease.update(uri=redact_uri(f"{store.uri.rstrip('/')}/{LEASE_FILE}"), stale_reason=reason or None)
        run_id = holder.run_id if holder else _latest_run(plans, summaries)
    else:
        run_id = _latest_run(plans, summaries)
        if run_id is None:
            if not store.data_files():
                raise SpecError(f"{store.uri} holds no Scriptorium results and no run is writing to it: "
                                "pass the --output of a run")
            state = "finished"  # results of a Scriptorium that kept no run records
        else:
            state = "finished" if _finished(plans.get(run_id), summaries.get(run_id)) else "stopped"
    status = {"output": redact_uri(store.uri), "state": state, "exit_code": EXIT_CODES[state],
              "checked_at": _iso(now), "lease": lease, "run": None}
    if run_id is not None:
        status["run"] = _run_status(store, run_id, plans.get(run_id), summaries.get(run_id), holder, state, now)
    return status


def _latest_run(plans: dict, summaries: dict) -> str | None:
    """The run id of the latest attempt: the latest plan, or without plans the latest summary."""
    if plans:
        return max(plans.values(), key=lambda p: p.get("planned") or 0)["run_id"]
    if summaries:
        return max(summaries.values(), key=lambda s: s.get("finished_at", ""))["run_id"]
    return None


def _finished(plan: dict | None, summary: dict | None) -> bool:
    """Did the run's latest attempt finish? It did when its summary was written after it planned."""
    if summary is None:
        return False
    return plan is None or (summary.get("finished_at") or "") >= _iso(plan.get("planned") or 0)


def _run_status(store: ParquetStore, run_id: str, plan: dict | None, summary: dict | None, holder, state: str,
                now: float) -> dict:
    counts = tally_run(store, run_id)
    run: dict = {"run_id": run_id, **counts, "plan": None, "attempt": None, "summary": None}
    current = plan is not None and (holder is None or state != "running" or plan.get("token") == holder.token)
    if current:
        run["plan"] = {"planned_at": _iso(plan["planned"]), "documents": plan["documents"],
                       "before": plan["before"]}
    if state == "running":
        if not current:  # this attempt has not finished planning yet: its plan record is an earlier one's
            run["plan"] = None
        else:
            elapsed = max(now - plan["planned"], 1e-9)
            documents = max(counts["documents"]["total"] - plan["before"]["documents"], 0)
            pages = max(counts["pages"]["total"] - plan["before"]["pages"], 0)
            eta = eta_seconds(elapsed, documents, plan["documents"]["planned"])
            run["attempt"] = {"elapsed_s": round(elapsed, 1), "documents": documents,
                              "documents_planned": plan["documents"]["planned"], "pages": pages,
                              "pages_per_s": round(pages / elapsed, 4),
                              "eta_s": None if eta is None else round(eta, 1)}
    if summary is not None and state == "finished":
        run["summary"] = {key: summary.get(key) for key in ("started_at", "finished_at", "wall_s", "throughput")}
    return run


def _iso(epoch_s: float) -> str:
    """As the run summaries write times (jobs/summary.py), so they compare as strings."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s % 1 * 1000):03d}Z"


def format_status(status: dict) -> str:
    lease, run, state = status["lease"], status["run"], status["state"]
    head = f"output {status['output']}: {state}"
    lines = []
    if lease and lease.get("run_id"):
        holder = (f"run {lease['run_id']} (host {lease['host']}, pid {lease['pid']}, heartbeat "
                  f"{lease['heartbeat_age_s']:.0f} s ago, holding it for {format_duration(lease['held_for_s'])})")
        head += f", {holder}" if state == "running" else ""
        if state == "stale":
            lines.append(f"  lease       left by {holder}: {lease['stale_reason']}; the next run of the output "
                         f"takes it over (or delete {lease['uri']})")
    elif lease:
        lines.append(f"  lease       unreadable: {lease['stale_reason']}; the next run takes it over")
    if state == "stopped":
        lines.append(f"  run         {run['run_id']} ended without finishing: rerun it with --run-id {run['run_id']} "
                     "to resume")
    if run is None:
        return "\n".join([head, *lines])
    if state == "finished":
        summary = run["summary"] or {}
        head += f", run {run['run_id']}" + (f" finished {summary['finished_at']}, wall "
                                             f"{format_duration(summary['wall_s'])}" if summary else "")
    plan, attempt = run["plan"], run["attempt"]
    if plan:
        documents = plan["documents"]
        lines.append(f"  plan        {documents['planned']} documents planned, {documents['skipped_complete']} "
                     f"already complete (planned {plan['planned_at']})")
    elif state == "running":
        lines.append("  plan        not written yet: the run is still planning")
    lines += count_lines(run)
    if attempt:
        eta = attempt["eta_s"]
        lines.append(f"  rate        {attempt['pages_per_s']:.3g} pages/s over {format_duration(attempt['elapsed_s'])}"
                     f" | docs {attempt['documents']}/{attempt['documents_planned']} | ETA "
                     + (format_duration(eta) if eta is not None else "?"))
    return "\n".join([head, *lines])
