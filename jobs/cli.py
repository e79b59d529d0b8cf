"""The `scriptorium` command line.

    scriptorium run --input URI --output URI --task {ocr,caption,qa} --model ID_OR_PATH [--question TEXT]
                    [--max-new-tokens N] [--device {auto,cpu,cuda}] [--job FILE.toml] ...
    scriptorium submit --address http://HEAD:8265 --job FILE.toml [--run-id ID] [--wait] [-- RUN FLAGS]
    scriptorium tiny-model DIR
    scriptorium summary OUTPUT [--run-id ID] [--json]
    scriptorium report OUTPUT --html FILE [--sample N] [--run-id ID]
    scriptorium inspect INPUT [--job FILE.toml] [--pages-per-second X] [--files] [--json]

Exit status: 0 when the run finished (inputs that failed are error rows in the output), 2 when the job
itself cannot run (bad spec, missing model, unusable output), with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.spec import JobSpec, SpecError, TaskSpec, load_spec
from jobs.submit import add_submit_arguments, cmd_submit


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", help="TOML job spec; flags given here override it")
    p.add_argument("--input", help="folder, glob, single file, or manifest (with --manifest); local, s3://, gs://")
    p.add_argument("--output", help="folder or prefix for the Parquet results")
    p.add_argument("--task", choices=["ocr", "caption", "qa"], help="replace the spec's tasks with this one")
    p.add_argument("--question", action="append", help="question for --task qa (repeatable)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--model", help="hub id (HuggingFaceM4/idefics2-8b) or local checkpoint path")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--attn-implementation", choices=["sdpa", "flash_attention_2", "eager"])
    p.add_argument("--quantization", choices=["none", "bnb-4bit", "awq"])
    p.add_argument("--prompt-format", choices=["auto", "instruct", "base"])
    p.add_argument("--image-splitting", dest="do_image_splitting", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--longest-edge", type=int)
    p.add_argument("--shortest-edge", type=int)
    p.add_argument("--replicas", type=int, help="model replicas (one per GPU)")
    p.add_argument("--gpus-per-replica", type=float)
    p.add_argument("--batch-size", type=int, help="pages per model batch at most (default: automatic)")
    p.add_argument("--max-batch-tokens", type=int,
                   help="prompt + new tokens per model batch (default: what the GPU's memory holds)")
    p.add_argument("--text-layer", action=argparse.BooleanOptionalAction, default=None,
                   help="OCR PDF pages that have a good embedded text layer from it, without the model")
    p.add_argument("--ocr-engine", choices=["idefics2", "tesseract"], help="tesseract: OCR on CPU, no model")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=None,
                   help="process pixel-identical pages once per run and reuse the result")
    p.add_argument("--run-id")
    p.add_argument("--address", help="Ray cluster address: auto or ray://host:10001 (default: local Ray)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, Ceph)")
    p.add_argument("--region")
    p.add_argument("--profile")
    p.add_argument("--anon", action="store_true", default=None, help="anonymous access to public buckets")
    p.add_argument("--include", action="append", help="only inputs matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", help="skip inputs matching this glob (repeatable)")
    p.add_argument("--manifest", action="store_true", default=None, help="--input is a manifest listing URIs")
    p.add_argument("--manifest-allow", action="append",
                   help="a URI prefix manifest entries may point at besides the manifest's own bucket or folder "
                        "and public web hosts (repeatable; '*' for anything)")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete previous results and start fresh")
    p.add_argument("--retry-failed", action="store_true", default=None, help="redo only the error rows")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = load_spec(args.job) if args.job else JobSpec()
    sections = {
        "input": {"uri": args.input, "include": args.include, "exclude": args.exclude, "manifest": args.manifest,
                  "manifest_allow": args.manifest_allow},
        "output": {"uri": args.output, "overwrite": args.overwrite, "retry_failed": args.retry_failed},
        "storage": {"endpoint_url": args.endpoint_url, "region": args.region, "profile": args.profile, "anon": args.anon},
        "model": {
            "id": args.model, "device": args.device, "dtype": args.dtype,
            "attn_implementation": args.attn_implementation, "quantization": args.quantization,
            "prompt_format": args.prompt_format, "do_image_splitting": args.do_image_splitting,
            "longest_edge": args.longest_edge, "shortest_edge": args.shortest_edge,
        },
        "routing": {"text_layer": args.text_layer, "ocr_engine": args.ocr_engine, "dedup": args.dedup},
        "resources": {"num_replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica,
                      "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
                      "address": args.address},
    }
    for section, values in sections.items():
        target = getattr(spec, section)
        for key, value in values.items():
            if value is not None:
                setattr(target, key, value)
    if args.run_id:
        spec.run_id = args.run_id
    if args.task:
        spec.tasks = [TaskSpec(kind=args.task, questions=args.question or [])]
    elif args.question:
        for task in spec.tasks:
            if task.kind == "qa":
                task.questions = args.question
    if args.max_new_tokens is not None:
        for task in spec.tasks:
            task.max_new_tokens = args.max_new_tokens
    return spec


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.runner import run_job

    from connectors.storage import redact

    spec = spec_from_args(args)
    result = run_job(spec)
    print(redact(
        f"run {result.run_id}: {result.planned_inputs} inputs processed, {result.skipped_inputs} already done; "
        f"{result.rows_written} rows written ({result.ok_rows} ok, {result.error_rows} error) "
        f"to {result.output} in {result.wall_s:.1f} s"
    ))
    if result.summary:
        from jobs.summary import format_summary

        print(redact(format_summary(result.summary)))
    return 0


def _add_storage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, Ceph)")
    p.add_argument("--region")
    p.add_argument("--profile")
    p.add_argument("--anon", action="store_true", help="anonymous access to public buckets")


def _storage_from_args(args: argparse.Namespace):
    from connectors.storage import StorageOptions

    return StorageOptions(args.endpoint_url or "", args.region or "", args.profile or "", bool(args.anon))


def _open_output(args: argparse.Namespace):
    """The output folder of a finished run, or SpecError in one line when it cannot be reached."""
    from connectors.parquet_sink import ParquetStore
    from connectors.storage import unreachable_reason

    storage = _storage_from_args(args)
    unreachable = unreachable_reason(args.output, storage)
    if unreachable:
        raise SpecError(f"cannot reach {args.output}: {unreachable}")
    return ParquetStore(args.output, storage), storage


def cmd_summary(args: argparse.Namespace) -> int:
    import json

    from jobs.summary import format_summary, load_summary

    store, _ = _open_output(args)
    summary = load_summary(store, args.run_id)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobs.report import build_report

    _, storage = _open_output(args)
    page, counts = build_report(args.output, storage, sample=args.sample, run_id=args.run_id)
    Path(args.html).write_text(page, encoding="utf-8")
    print(f"report of {counts['pages']} pages ({counts['rows']} rows) written to {args.html}")
    return 0


def _inspect_spec(args: argparse.Namespace) -> JobSpec:
    """The spec `inspect` plans with: the --job file's, with INPUT and the flags given on top of it."""
    spec = load_spec(args.job) if args.job else JobSpec()
    spec.input.uri = args.input or spec.input.uri
    if not spec.input.uri:
        raise SpecError("no input: pass INPUT or a --job with [input] uri")
    spec.input.include = args.include or spec.input.include
    spec.input.exclude = args.exclude or spec.input.exclude
    spec.input.manifest = args.manifest or spec.input.manifest
    spec.storage.endpoint_url = args.endpoint_url or spec.storage.endpoint_url
    spec.storage.region = args.region or spec.storage.region
    spec.storage.profile = args.profile or spec.storage.profile
    spec.storage.anon = args.anon or spec.storage.anon
    return spec


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from connectors.storage import StorageOptions, unreachable_reason
    from jobs.inspect_input import format_inspection, inspect_inputs, summarize_inspection

    spec = _inspect_spec(args)
    if args.pages_per_second <= 0:
        raise SpecError("--pages-per-second must be > 0")
    storage = StorageOptions.from_spec(spec.storage, spec.input)
    unreachable = unreachable_reason(spec.input.uri, storage)
    if unreachable:
        raise SpecError(f"cannot reach input {spec.input.uri}: {unreachable}")
    try:
        report = summarize_inspection(inspect_inputs(spec.input, storage, spec.render), spec, args.pages_per_second)
    except FileNotFoundError:
        raise SpecError(f"input {spec.input.uri} does not exist") from None
    print(json.dumps(report, indent=2) if args.json else format_inspection(report, list_files=args.files))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.tiny_model import build_tiny_idefics2

    path = build_tiny_idefics2(args.dir, do_image_splitting=args.image_splitting)
    print(f"tiny random-weight Idefics2 checkpoint written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptorium", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a job")
    _add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    add_submit_arguments(submit)
    submit.set_defaults(func=cmd_submit)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight Idefics2 checkpoint offline")
    tiny.add_argument("dir")
    tiny.add_argument("--image-splitting", action=argparse.BooleanOptionalAction, default=False)
    tiny.set_defaults(func=cmd_tiny_model)

    summary = sub.add_parser("summary", help="print the summary of a finished run and its output folder")
    summary.add_argument("output", help="the --output of a run")
    summary.add_argument("--run-id", help="this run instead of the latest")
    summary.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_storage_arguments(summary)
    summary.set_defaults(func=cmd_summary)

    report = sub.add_parser("report", help="write an HTML page to review results next to page thumbnails")
    report.add_argument("output", help="the --output of a run")
    report.add_argument("--html", required=True, help="file to write")
    report.add_argument("--sample", type=int, default=50, help="pages to sample besides every page with an error")
    report.add_argument("--run-id", help="only this run's rows")
    _add_storage_arguments(report)
    report.set_defaults(func=cmd_report)

    from jobs.inspect_input import DEFAULT_PAGES_PER_SECOND

    inspect = sub.add_parser("inspect", help="list what a job would process and estimate its GPU-hours (no model)")
    inspect.add_argument("input", nargs="?", help="folder, glob, file or manifest (default: the --job's input)")
    inspect.add_argument("--job", help="TOML job spec: its input filters, render limits, tasks and resources")
    inspect.add_argument("--include", action="append", help="only inputs matching this glob (repeatable)")
    inspect.add_argument("--exclude", action="append", help="skip inputs matching this glob (repeatable)")
    inspect.add_argument("--manifest", action="store_true", help="INPUT is a manifest listing URIs")
    inspect.add_argument("--pages-per-second", type=float, default=DEFAULT_PAGES_PER_SECOND,
                         help=f"pages per second per GPU and task (default {DEFAULT_PAGES_PER_SECOND}, an "
                              "assumption: use the pages/s of a pilot run's summary)")
    inspect.add_argument("--files", action="store_true", help="list every file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_storage_arguments(inspect)
    inspect.set_defaults(func=cmd_inspect)
    return parser


class RedactingFormatter(logging.Formatter):
    """Log lines without credentials or signed-URL secrets, whatever logged them (connectors/storage.py)."""

    def format(self, record: logging.LogRecord) -> str:
        from connectors.storage import redact

        return redact(super().format(record))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    parser = build_parser()
    args = parser.parse_args(argv)
    from connectors.parquet_sink import OutputError
    from connectors.storage import redact

    try:
        return args.func(args)
    except (SpecError, OutputError) as exc:
        print(f"scriptorium: error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
