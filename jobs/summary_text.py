"""Run summaries as people read them (`scriptorium run`, `scriptorium summary`, the report's header) and
as JSON (the summary files, `scriptorium summary --json`)."""

from __future__ import annotations

import json


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)


def format_summary(summary: dict) -> str:
    lines = []
    run, output = summary.get("run"), summary.get("output")
    if run:
        attempts = run.get("attempts") or []
        lines.append(f"run {run['run_id']}  finished {run['finished_at']}  wall {format_duration(run['wall_s'])}"
                     + (f" over {len(attempts)} attempts" if len(attempts) > 1 else ""))
        lines.append(f"  model       {run['model']}  tasks: {', '.join(run['tasks'])}")
        inputs = run["inputs"]
        lines.append(f"  inputs      {inputs['planned']} processed, {inputs['skipped_complete']} already complete")
        lines += count_lines(run)
        throughput = run["throughput"]
        if throughput["pages_per_s"] is not None:
            lines.append(f"  throughput  {throughput['pages_per_s']:.3g} pages/s, "
                         f"{throughput['output_tokens_per_s']:.3g} output tokens/s (over wall time)")
        lines.append("  GPU         " + _gpu_line(run["gpu"]))
    if output:
        runs = output["runs"]
        lines.append(f"output {output['output']}  {output['n_files']} files from {len(runs)} run(s)"
                     + (f", {format_duration(output['wall_s_total'])} in all" if runs else ""))
        lines += count_lines(output)
        if output["gpu_hours_total"]:
            cost = output["cost_total"]
            lines.append(f"  GPU         {output['gpu_hours_total']:.4g} GPU-hours in all"
                         + (f", cost {cost:,.2f}" if cost else ""))
    return "\n".join(lines)


def count_lines(view: dict) -> list[str]:
    docs, pages, rows, tokens = view["documents"], view["pages"], view["rows"], view["tokens"]
    lines = [
        f"  documents   {docs['total']} ({docs['with_errors']} with errors)",
        f"  pages       {pages['total']} ({pages['ok']} ok, {pages['error']} with errors)",
        f"  rows        {rows['total']}: " + _pairs(rows["by_status"]) + "; by task: " + _pairs(rows["by_task"])
        + f"; {rows['truncated']} hit max_new_tokens",
        f"  tokens      {tokens['input']:,} input, {tokens['output']:,} output",
    ]
    for reason, count in list(view["errors_by_reason"].items())[:10]:
        lines.append(f"  error       {count} x {reason}")
    if len(view["errors_by_reason"]) > 10:
        lines.append(f"  error       ... {len(view['errors_by_reason']) - 10} more reasons in the JSON")
    return lines


def _pairs(counts: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items()) or "none"


def _gpu_line(gpu: dict) -> str:
    if not gpu["gpus_per_replica"]:
        return "none requested (CPU run): no GPU-hours or GPU cost"
    line = f"{gpu['replicas']} replica(s) x {gpu['gpus_per_replica']:g} GPU = {gpu['gpu_hours']:.4g} GPU-hours"
    if gpu["cost"] is None:
        return line + "; set resources.gpu_price_per_hour for cost figures"
    line += f" x {gpu['price_per_hour']:g}/GPU-hour = {gpu['cost']:,.4g}"
    if gpu["cost_per_million_pages"] is not None:
        line += f"; {gpu['cost_per_million_pages']:,.2f} per million pages"
    return line


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or M:SS under an hour."""
    seconds = int(round(seconds or 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
