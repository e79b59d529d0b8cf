"""The `scriptorium` command line.

    scriptorium run --input URI --output URI --task {ocr,caption,qa} --model ID_OR_PATH [--question TEXT]
                    [--max-new-tokens N] [--device {auto,cpu,cuda}] [--job FILE.toml] ...
    scriptorium tiny-model DIR

Exit status: 0 when the run finished (inputs that failed are error rows in the output), 2 when the job
itself cannot run (bad spec, missing model, unusable output), with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.spec import JobSpec, SpecError, TaskSpec, load_spec


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
    p.add_argument("--batch-size", type=int)
    p.add_argument("--run-id")
    p.add_argument("--address", help="Ray cluster address: auto or ray://host:10001 (default: local Ray)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, Ceph)")
    p.add_argument("--region")
    p.add_argument("--profile")
    p.add_argument("--anon", action="store_true", default=None, help="anonymous access to public buckets")
    p.add_argument("--include", action="append", help="only inputs matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", help="skip inputs matching this glob (repeatable)")
    p.add_argument("--manifest", action="store_true", default=None, help="--input is a manifest listing URIs")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete previous results and start fresh")
    p.add_argument("--retry-failed", action="store_true", default=None, help="redo only the error rows")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = load_spec(args.job) if args.job else JobSpec()
    sections = {
        "input": {"uri": args.input, "include": args.include, "exclude": args.exclude, "manifest": args.manifest},
        "output": {"uri": args.output, "overwrite": args.overwrite, "retry_failed": args.retry_failed},
        "storage": {"endpoint_url": args.endpoint_url, "region": args.region, "profile": args.profile, "anon": args.anon},
        "model": {
            "id": args.model, "device": args.device, "dtype": args.dtype,
            "attn_implementation": args.attn_implementation, "quantization": args.quantization,
            "prompt_format": args.prompt_format, "do_image_splitting": args.do_image_splitting,
            "longest_edge": args.longest_edge, "shortest_edge": args.shortest_edge,
        },
        "resources": {"num_replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica,
                      "batch_size": args.batch_size, "address": args.address},
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

    spec = spec_from_args(args)
    result = run_job(spec)
    print(
        f"run {result.run_id}: {result.planned_inputs} inputs processed, {result.skipped_inputs} already done; "
        f"{result.rows_written} rows written ({result.ok_rows} ok, {result.error_rows} error) "
        f"to {result.output} in {result.wall_s:.1f} s"
    )
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
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight Idefics2 checkpoint offline")
    tiny.add_argument("dir")
    tiny.add_argument("--image-splitting", action=argparse.BooleanOptionalAction, default=False)
    tiny.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    from connectors.parquet_sink import OutputError

    try:
        return args.func(args)
    except (SpecError, OutputError) as exc:
        print(f"scriptorium: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
