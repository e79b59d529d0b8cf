"""Command-line flags as spec settings: each flag names the setting it overrides, and a flag with choices
offers exactly the values the spec accepts (read off the spec's own types)."""

from __future__ import annotations

import argparse
import os
from typing import Mapping, get_args

from scriptorium.core.spec import JobSpec, Section, StorageSpec, TaskSpec, choices, load_spec

BOOLEAN = argparse.BooleanOptionalAction

# (flag, the setting it sets, argparse options). A setting whose type is a set of choices gets them as the
# flag's choices. `store_true` flags default to None, so an unset flag leaves the job file's value alone.
STORAGE_FLAGS = [
    ("--endpoint-url", "storage.endpoint_url", dict(help="S3-compatible endpoint (MinIO, R2, Ceph)")),
    ("--gcs-endpoint-url", "storage.gcs_endpoint_url", dict(help="GCS emulator or gateway (JSON API)")),
    ("--region", "storage.region", {}),
    ("--profile", "storage.profile", {}),
    ("--anon", "storage.anon", dict(action="store_true", default=None, help="anonymous access to public buckets")),
]
INPUT_FILTER_FLAGS = [
    ("--include", "input.include", dict(action="append", help="only inputs matching this glob (repeatable)")),
    ("--exclude", "input.exclude", dict(action="append", help="skip inputs matching this glob (repeatable)")),
    ("--manifest", "input.manifest", dict(action="store_true", default=None, help="the input is a manifest listing URIs")),
    ("--manifest-allow", "input.manifest_allow",
     dict(action="append", help="a URI prefix manifest entries may point at besides the manifest's own bucket or "
                                "folder and public web hosts (repeatable; '*' for anything)")),
]
RUN_FLAGS = INPUT_FILTER_FLAGS + [
    ("--input", "input.uri", dict(help="folder, glob, single file, or manifest (with --manifest); local, s3://, gs://")),
    ("--output", "output.uri", dict(help="folder or prefix for the Parquet results")),
    ("--overwrite", "output.overwrite", dict(action="store_true", default=None, help="delete previous results and start fresh")),
    ("--retry-failed", "output.retry_failed", dict(action="store_true", default=None, help="redo only the error rows")),
    ("--wait", "output.wait", dict(action="store_true", default=None,
                                   help="if another run is writing to the output, wait for it to finish instead of exiting")),
    ("--model", "model.id", dict(help="hub id (HuggingFaceM4/idefics2-8b) or local checkpoint path")),
    ("--device", "model.device", {}),
    ("--dtype", "model.dtype", {}),
    ("--attn-implementation", "model.attn_implementation", {}),
    ("--quantization", "model.quantization", {}),
    ("--prompt-format", "model.prompt_format", {}),
    ("--engine", "model.engine", dict(help="how the model stage batches generation (docs/data-path.md#engines)")),
    ("--image-splitting", "model.do_image_splitting", dict(action=BOOLEAN, default=None)),
    ("--longest-edge", "model.longest_edge", dict(type=int)),
    ("--shortest-edge", "model.shortest_edge", dict(type=int)),
    ("--replicas", "resources.num_replicas", dict(type=int, help="model replicas (one per GPU)")),
    ("--gpus-per-replica", "resources.gpus_per_replica", dict(type=float)),
    ("--batch-size", "resources.batch_size", dict(type=int, help="pages per model batch at most (default: automatic)")),
    ("--max-batch-tokens", "resources.max_batch_tokens",
     dict(type=int, help="prompt + new tokens per model batch (default: what the GPU's memory holds)")),
    ("--address", "resources.address", dict(help="Ray cluster address: auto (default: a local Ray)")),
    ("--text-layer", "routing.text_layer", dict(action=BOOLEAN, default=None,
                                                help="OCR PDF pages that have a good embedded text layer from it, without the model")),
    ("--ocr-engine", "routing.ocr_engine", dict(help="tesseract: OCR on CPU, no model")),
    ("--dedup", "routing.dedup", dict(action=BOOLEAN, default=None,
                                      help="process pixel-identical pages once per run and reuse the result")),
    ("--run-id", "run_id", {}),
    ("--log-format", "logging.format", dict(help="text (default) or json: one JSON object per line, for log collectors")),
]


def setting_choices(setting: str) -> tuple[str, ...] | None:
    """The values a setting accepts when its type is a set of choices (`model.dtype`), else None."""
    model: type[Section] = JobSpec
    *sections, key = setting.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    values = get_args(model.model_fields[key].annotation)  # a Literal's values; a union's member types
    return values if values and all(isinstance(v, str) for v in values) else None


def add_flags(p: argparse.ArgumentParser, flags) -> None:
    for flag, setting, options in flags:
        allowed = setting_choices(setting)
        p.add_argument(flag, **({"choices": allowed} if allowed else {}), **options)


def _dest(flag: str) -> str:
    """argparse's attribute for a flag: --max-batch-tokens -> max_batch_tokens."""
    return flag.lstrip("-").replace("-", "_")


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, STORAGE_FLAGS)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", help="TOML job spec; flags given here override it")
    p.add_argument("--task", choices=choices(TaskSpec.model_fields["kind"].annotation),
                   help="replace the spec's tasks with this one")
    p.add_argument("--question", action="append", help="question for --task qa (repeatable)")
    p.add_argument("--prompt", help="the prompt of --task custom (or an override of the built-in one)")
    p.add_argument("--max-new-tokens", type=int)
    add_flags(p, RUN_FLAGS + STORAGE_FLAGS)


def overrides(args: argparse.Namespace, flags) -> dict:
    """{section: {key: value}} (and top-level settings) for the flags that were given."""
    changes: dict = {}
    for flag, setting, _options in flags:
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        *sections, key = setting.split(".")
        target = changes
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return changes


def storage_from_args(args: argparse.Namespace) -> StorageSpec:
    return StorageSpec().updated(**overrides(args, STORAGE_FLAGS).get("storage", {}))


def spec_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> JobSpec:
    """The job file's spec (or an empty one) with the flags given applied on top, then the SCRIPTORIUM_*
    environment variables for what neither set (`ResourceSpec.with_environment`): the one place a run
    reads its environment, so the runner and the stages see only the spec."""
    spec = load_spec(args.job) if args.job else JobSpec()
    changes = overrides(args, RUN_FLAGS + STORAGE_FLAGS)
    tasks = [task.model_dump() for task in spec.tasks]
    if args.task:
        tasks = [{"kind": args.task, "questions": args.question or [], "prompt": args.prompt or ""}]
    elif args.question:
        tasks = [{**task, "questions": args.question} if task["kind"] == "qa" else task for task in tasks]
    if args.max_new_tokens is not None:
        tasks = [{**task, "max_new_tokens": args.max_new_tokens} for task in tasks]
    spec = spec.updated(**changes, tasks=tasks)
    return spec.updated(resources=spec.resources.with_environment(environ).model_dump())
