"""The `scriptorium` command line.

    scriptorium run --input URI --output URI --task {ocr,caption,qa,custom} --model ID_OR_PATH [--question TEXT]
                    [--max-new-tokens N] [--device {auto,cpu,cuda}] [--job FILE.toml] ...
    scriptorium submit --address http://HEAD:8265 --job FILE.toml [--run-id ID] [--wait] [-- RUN FLAGS]
    scriptorium tiny-model DIR [--family {idefics2,idefics3,smolvlm}] [--image-splitting]
    scriptorium summary OUTPUT [--run-id ID] [--json]
    scriptorium status OUTPUT [--json]
    scriptorium report OUTPUT --html FILE [--sample N] [--run-id ID]
    scriptorium export OUTPUT --to URI --format {markdown,text,jsonl,dolma} [--text-task NAME] [--run-id ID]
    scriptorium inspect INPUT [--job FILE.toml] [--model ID_OR_PATH] [--pages-per-second X] [--files] [--json]
    scriptorium schema [--output FILE]

Exit status: 0 when the run finished (inputs that failed are error rows in the output), 2 when the job
itself cannot run (bad spec, missing model, unusable output, an output another run is writing to), with
one line saying what to fix. `scriptorium status` exits 0 (finished), 3 (running), 4 (stale lease) or
5 (stopped), see jobs/status.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import unreachable_reason
from scriptorium.core.errors import OutputError, SpecError
from scriptorium.core.redaction import redact
from scriptorium.core.spec import JobSpec, json_schema, load_spec, new_run_id
from scriptorium.jobs.arguments import (
    INPUT_FILTER_FLAGS,
    RUN_FLAGS,
    STORAGE_FLAGS,
    add_flags,
    add_run_arguments,
    add_storage_arguments,
    overrides,
    spec_from_args,
    storage_from_args,
)
from scriptorium.jobs.export import TABLE_FORMATS, export
from scriptorium.jobs.export_formats import FORMATS
from scriptorium.jobs.logs import configure_logging, event_line, json_active
from scriptorium.jobs.inspect_input import (
    DEFAULT_PAGES_PER_SECOND,
    format_inspection,
    inspect_inputs,
    summarize_inspection,
)
from scriptorium.jobs.report import build_report
from scriptorium.jobs.status import format_status, output_status
from scriptorium.jobs.submit import add_submit_arguments, cmd_submit
from scriptorium.jobs.summary_files import load_summary
from scriptorium.jobs.summary_text import format_summary, summary_json


def cmd_run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    # The run id is fixed first, so that every log line of the run carries it (jobs/logs.py).
    spec = spec.updated(run_id=spec.run_id or new_run_id())
    configure_logging(spec.logging.format, spec.run_id)
    # A spec that cannot run fails first, in a second, without loading what a run needs.
    spec.check_runnable()
    # Imported here: torch, transformers and Ray (~8 s) load only for the commands that use them.
    from scriptorium.jobs.runner import run_job

    # `ray job stop`, a deadline's `timeout` and Kubernetes stop a run with SIGTERM: exit through the
    # run's cleanup, which releases the output's lease, instead of dying on the spot.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run_job(spec)
    line = (f"run {result.run_id}: {result.planned_inputs} inputs processed, {result.skipped_inputs} already done; "
            f"{result.rows_written} rows written ({result.ok_rows} ok, {result.error_rows} error) "
            f"to {result.output} in {result.wall_s:.1f} s")
    if json_active():
        print(event_line("run.finished", line, planned_inputs=result.planned_inputs,
                         skipped_inputs=result.skipped_inputs, rows_written=result.rows_written,
                         ok_rows=result.ok_rows, error_rows=result.error_rows, output=result.output,
                         wall_s=round(result.wall_s, 3), summary=result.summary), flush=True)
        return 0
    print(redact(line))
    if result.summary:
        print(redact(format_summary(result.summary)))
    return 0


def _open_output(args: argparse.Namespace) -> ParquetStore:
    """The output folder of a finished run, or SpecError in one line when it cannot be reached."""
    storage = storage_from_args(args)
    unreachable = unreachable_reason(args.output, storage)
    if unreachable:
        raise SpecError(f"cannot reach {args.output}: {unreachable}")
    return ParquetStore(args.output, storage)


def cmd_summary(args: argparse.Namespace) -> int:
    summary = load_summary(_open_output(args), args.run_id)
    print(redact(summary_json(summary) if args.json else format_summary(summary)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = output_status(_open_output(args), args.lease_timeout_s)
    print(redact(json.dumps(status, indent=2) if args.json else format_status(status)))
    return status["exit_code"]


def cmd_report(args: argparse.Namespace) -> int:
    store = _open_output(args)
    page, counts = build_report(args.output, store.options, sample=args.sample, run_id=args.run_id)
    Path(args.html).write_text(page, encoding="utf-8")
    print(f"report of {counts['pages']} pages ({counts['rows']} rows) written to {args.html}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    storage = _open_output(args).options
    unreachable = unreachable_reason(args.to, storage)
    if unreachable:
        raise SpecError(f"cannot reach {args.to}: {unreachable}")
    counts = export(args.output, args.to, args.format, storage, text_task=args.text_task, run_id=args.run_id,
                    task=args.task)
    if args.format in TABLE_FORMATS:
        print(f"exported {counts['rows']} records of task {args.task} ({counts['ok']} ok, the others error rows "
              f"with their reason) to {args.to} as {args.format}")
        return 0
    print(f"exported {counts['documents']} documents ({counts['pages']} pages) to {args.to} as {args.format} "
          f"in {counts['files']} files; {counts['error_units']} error and {counts['missing_units']} missing "
          "results are marked as such")
    return 0


# `inspect` takes the flags that change what it lists, and those that name the model and its image settings:
# a job's model decides its image tokens per page, and whether the default pages/s applies (inspect_input.py).
INSPECT_MODEL_FLAGS = [flag for flag in RUN_FLAGS if flag[0] in ("--model", "--image-splitting", "--longest-edge")]
INSPECT_FLAGS = INPUT_FILTER_FLAGS + STORAGE_FLAGS + INSPECT_MODEL_FLAGS


def _inspect_spec(args: argparse.Namespace) -> JobSpec:
    """The spec `inspect` plans with: the --job file's, with INPUT and the flags given on top of it."""
    spec = load_spec(args.job) if args.job else JobSpec()
    changes = overrides(args, INSPECT_FLAGS)
    if args.input:
        changes.setdefault("input", {})["uri"] = args.input
    spec = spec.updated(**changes)
    if not spec.input.uri:
        raise SpecError("no input: pass INPUT or a --job with [input] uri")
    return spec


def cmd_inspect(args: argparse.Namespace) -> int:
    spec = _inspect_spec(args)
    if args.pages_per_second is not None and args.pages_per_second <= 0:
        raise SpecError("--pages-per-second must be > 0")
    unreachable = unreachable_reason(spec.input.uri, spec.storage)
    if unreachable:
        raise SpecError(f"cannot reach input {spec.input.uri}: {unreachable}")
    try:
        storage = spec.storage.with_manifest_policy(spec.input)  # http(s) reads as a run makes them
        report = summarize_inspection(inspect_inputs(spec.input, storage, spec.render), spec, args.pages_per_second)
    except FileNotFoundError:
        raise SpecError(f"input {spec.input.uri} does not exist") from None
    print(json.dumps(report, indent=2) if args.json else format_inspection(report, list_files=args.files))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from scriptorium.pipeline.model.tiny import build_tiny  # imported here: it loads torch and transformers

    options = {} if args.image_splitting is None else {"do_image_splitting": args.image_splitting}
    path = build_tiny(args.dir, family=args.family, **options)
    print(f"tiny random-weight {args.family} checkpoint written to {path}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(f"JSON Schema of a job spec written to {args.output}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptorium", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a job")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    add_submit_arguments(submit)
    submit.set_defaults(func=cmd_submit)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight Idefics2/Idefics3/SmolVLM checkpoint offline")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=("idefics2", "idefics3", "smolvlm"), default="idefics2")
    # Default: the family's (Idefics2 off, Idefics3 and SmolVLM on, as their real checkpoints).
    tiny.add_argument("--image-splitting", action=argparse.BooleanOptionalAction, default=None)
    tiny.set_defaults(func=cmd_tiny_model)

    summary = sub.add_parser("summary", help="print the summary of a finished run and its output folder")
    summary.add_argument("output", help="the --output of a run")
    summary.add_argument("--run-id", help="this run instead of the latest")
    summary.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_storage_arguments(summary)
    summary.set_defaults(func=cmd_summary)

    status = sub.add_parser("status", help="whether a run is writing to an output, what it has done, its rate "
                            "and ETA (exit 0 finished, 3 running, 4 stale lease, 5 stopped)")
    status.add_argument("output", help="the --output of a run")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--lease-timeout-s", type=float,
                        help="judge a lease stale after this long without a heartbeat, when the lease does not "
                             "say (one written by an older Scriptorium; default 120)")
    add_storage_arguments(status)
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write an HTML page to review results next to page thumbnails")
    report.add_argument("output", help="the --output of a run")
    report.add_argument("--html", required=True, help="file to write")
    report.add_argument("--sample", type=int, default=50, help="pages to sample besides every page with an error")
    report.add_argument("--run-id", help="only this run's rows")
    add_storage_arguments(report)
    report.set_defaults(func=cmd_report)

    export_parser = sub.add_parser("export", help="write an output's results as documents: Markdown, text, "
                                   "JSONL or Dolma; or an extract task's records as CSV")
    export_parser.add_argument("output", help="the --output of a run")
    export_parser.add_argument("--to", required=True,
                               help="folder or prefix to write to (local, s3://, gs://); must be empty")
    export_parser.add_argument("--format", required=True, choices=FORMATS + TABLE_FORMATS)
    export_parser.add_argument("--task", help="--format csv: the extract task whose records to export")
    export_parser.add_argument("--text-task", default="ocr",
                               help="the task whose text is each page's text (default ocr); other tasks become "
                                    "sections")
    export_parser.add_argument("--run-id", help="only this run's rows")
    add_storage_arguments(export_parser)
    export_parser.set_defaults(func=cmd_export)

    inspect = sub.add_parser("inspect", help="list what a job would process and estimate its GPU-hours (no model)")
    inspect.add_argument("input", nargs="?", help="folder, glob, file or manifest (default: the --job's input)")
    inspect.add_argument("--job", help="TOML job spec: its input filters, render limits, tasks and resources")
    add_flags(inspect, INSPECT_FLAGS)
    inspect.add_argument("--pages-per-second", type=float,
                         help=f"pages per second per GPU and task (default, for Idefics2 only: "
                              f"{DEFAULT_PAGES_PER_SECOND}, measured on an H200 at 512 new tokens; other families "
                              "have none: use a pilot run's pages/s)")
    inspect.add_argument("--files", action="store_true", help="list every file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=cmd_inspect)

    schema = sub.add_parser("schema", help="print the JSON Schema of a job spec (for editors' TOML completion)")
    schema.add_argument("--output", help="write it to this file instead")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging("text")
    args = build_parser().parse_args(argv)
    if getattr(args, "log_format", None) == "json":  # before the spec loads: its errors are JSON lines too
        configure_logging("json", args.run_id)
    try:
        return args.func(args)
    except (SpecError, OutputError) as exc:
        if json_active():
            print(event_line("error", str(exc), level="ERROR", exit_code=2), file=sys.stderr, flush=True)
        else:
            print(f"scriptorium: error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
